"""The gateway's errors: those of the mesh (services/common/failures.py), and an
answer aborted midway."""

from __future__ import annotations

from services.common.failures import HttpError, bad, from_rpc_error, from_service_error

__all__ = ["AnswerAborted", "HttpError", "bad", "from_rpc_error", "from_service_error"]


class AnswerAborted(Exception):
    """An answer that cannot be finished once it has begun (its client stopped reading,
    or a service failed midway): the connection is closed without the answer's end, so
    the client sees it failed, never a truncated 200."""
