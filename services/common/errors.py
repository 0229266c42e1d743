"""Errors that carry their gRPC status and a stable reason, raised by engines
and servicers alike and turned into a status (and an HTTP code) in one place."""

import grpc
from imagemesh.v1 import common_pb2

# An error message travels in gRPC metadata (8 KiB at most) and HTTP headers: what
# a client sent is quoted in part (quoted), and no message is longer than this.
MAX_MESSAGE_CHARS = 1000


def quoted(value: object, limit: int = 40) -> str:
    """A client's value for an error message: its repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def capped(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "..."


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL
    reason = "internal"

    def __init__(self, message: str, *, reason: str | None = None, field: str = ""):
        message = capped(message)
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason
        self.field = field


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "invalid_argument"


class StreamEndedEarly(InvalidArgument):
    """A request stream that ended before its image was whole. gRPC ends a cancelled
    call's request stream too, at times before it cancels the handler."""


class LimitExceeded(ServiceError):
    """A configured size limit was broken (HTTP 413)."""

    code = grpc.StatusCode.OUT_OF_RANGE
    reason = "limit_exceeded"


class UndecodableImage(ServiceError):
    """The bytes are not an image we can decode (HTTP 422)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "undecodable_image"


class UnsupportedMediaType(ServiceError):
    """An image format the API does not take (HTTP 415)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "unsupported_media_type"


class ModelNotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "model_not_found"


class ModelNotReady(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "model_not_ready"


class Overloaded(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "overloaded"


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "unavailable"


class StreamTimeout(ServiceError):
    """A client stream that kept the service waiting past a configured time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "stream_timeout"


# A refused call's ErrorDetail (reason, message, field) travels in this binary trailer.
ERROR_TRAILER = "imagemesh-error-bin"


def error_trailer(exc: ServiceError) -> tuple[tuple[str, bytes], ...]:
    detail = common_pb2.ErrorDetail(reason=exc.reason, message=exc.message, field=exc.field)
    return ((ERROR_TRAILER, detail.SerializeToString()),)


def error_detail(exc: grpc.aio.AioRpcError) -> common_pb2.ErrorDetail:
    """What the service said of a failed call (empty when it sent no ErrorDetail)."""
    detail = common_pb2.ErrorDetail()
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_TRAILER:
            detail.ParseFromString(value)
    return detail
