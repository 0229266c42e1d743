"""What a failure means to whoever called the mesh, as an HTTP status with a
reason and a message: a gRPC status (or a local ServiceError) mapped once, for
the gateway's answers and the client library's errors alike."""

from __future__ import annotations

import grpc

from .errors import ServiceError, capped, error_detail

_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 413,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 503,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,
}
_BY_REASON = {"undecodable_image": 422, "unsupported_media_type": 415, "empty_image": 400}
RETRY_AFTER_SECONDS = 2


class HttpError(Exception):
    """A failure with the HTTP status, reason and message its caller should see."""

    def __init__(self, status: int, reason: str, message: str, headers: dict | None = None):
        message = capped(message)
        super().__init__(message)
        self.status, self.reason, self.message, self.headers = status, reason, message, headers or {}


def bad(message: str) -> HttpError:
    return HttpError(400, "invalid_argument", message)


def _headers(status: int) -> dict:
    return {"Retry-After": str(RETRY_AFTER_SECONDS)} if status in (429, 503) else {}


def from_service_error(exc: ServiceError) -> HttpError:
    status = _BY_REASON.get(exc.reason) or _BY_CODE.get(exc.code, 500)
    return HttpError(status, exc.reason, exc.message, _headers(status))


def from_rpc_error(exc: grpc.aio.AioRpcError, upstream: str) -> HttpError:
    detail = error_detail(exc)
    code = exc.code()
    status = _BY_REASON.get(detail.reason) or _BY_CODE.get(code, 500)
    if code == grpc.StatusCode.UNAVAILABLE:
        return HttpError(
            503, "upstream_unavailable", f"the {upstream} service is unavailable; retry later", _headers(503)
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return HttpError(504, "upstream_timeout", f"the {upstream} service did not answer in time")
    if code == grpc.StatusCode.INTERNAL and "Internal error from Core" in (exc.details() or ""):
        # grpc-python's aio client reports a stream cut under a pending write this way (grpc/grpc#36066).
        return HttpError(
            503, "upstream_connection_lost", f"the connection to the {upstream} service was lost", _headers(503)
        )
    if status == 500:
        return HttpError(500, "internal", f"the {upstream} service failed")
    return HttpError(status, detail.reason or code.name.lower(), exc.details() or code.name, _headers(status))
