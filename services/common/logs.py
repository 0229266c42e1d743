"""JSON logs, one object a line, carrying the request id of the call in progress."""

import contextvars
import json
import logging
import re
import sys
import time
import uuid

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

REQUEST_ID_HEADER = "x-request-id"


_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,64}")


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_or_new(given: str) -> str:
    """The caller's request id when it is a safe token (it is echoed in headers and
    metadata and logged), else a new one."""
    return given if _SAFE_REQUEST_ID.fullmatch(given) else new_request_id()


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def log(logger: logging.Logger, level: int, msg: str, **fields) -> None:
    """Log with structured fields that land as keys of the JSON object."""
    logger.log(level, msg, extra={"fields": fields})
