"""Reading an image request in any of its input styles (multipart `file`, or
JSON `image_base64`) and its parameters, with clear 4xx errors."""
from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from .errors import HttpError

# Base64 grows data by 4/3; JSON and multipart add a little framing.
_ENVELOPE_FACTOR, _ENVELOPE_SLACK = 1.4, 64 * 1024


@dataclass
class ImageRequest:
    data: bytes
    params: dict[str, Any]

    def text(self, name: str, default: str, choices: tuple[str, ...] | None = None,
             aliases: dict[str, str] | None = None) -> str:
        value = self.params.get(name)
        if value is None or value == "":
            return default
        if not isinstance(value, str):
            raise HttpError(400, "invalid_argument", f"{name} must be a string")
        value = value.strip()
        value = (aliases or {}).get(value.lower(), value)
        if choices and value.lower() not in choices:
            raise HttpError(400, "invalid_argument", f"{name} must be one of {', '.join(choices)}; got {value!r}")
        return value.lower() if choices else value

    def number(self, name: str, default: float, *, integer: bool = False,
               minimum: float | None = None, maximum: float | None = None) -> float:
        value = self.params.get(name)
        if value is None or value == "":
            return default
        kind = "an integer" if integer else "a number"
        if isinstance(value, bool):
            raise HttpError(400, "invalid_argument", f"{name} must be {kind}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise HttpError(400, "invalid_argument", f"{name} must be {kind}; got {value!r}") from None
        if not math.isfinite(number) or (integer and not number.is_integer()):
            raise HttpError(400, "invalid_argument", f"{name} must be {kind}; got {value!r}")
        if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
            raise HttpError(400, "invalid_argument", f"{name} must be between {minimum:g} and {maximum:g}; got {value}")
        return int(number) if integer else number


def decode_base64(text: Any, field: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise HttpError(400, "invalid_argument", f"{field} must be a non-empty base64 string")
    if text.startswith("data:") and "," in text:  # data URL
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, "invalid_argument", f"{field} is not valid base64") from None


async def read_image_request(request: Request, max_bytes: int) -> ImageRequest:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes * _ENVELOPE_FACTOR + _ENVELOPE_SLACK:
        raise HttpError(413, "upload_too_large", f"the request is {declared} bytes; images may be {max_bytes} bytes")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_files=2, max_fields=64)
        except Exception:
            raise HttpError(400, "invalid_argument", "the multipart body is malformed") from None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HttpError(400, "invalid_argument", "multipart field 'file' (the image) is required")
        data = await upload.read(max_bytes + 1)
        params = {key: value for key, value in form.items() if isinstance(value, str)}
        return ImageRequest(data, params)
    if content_type == "application/json":
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise HttpError(400, "invalid_argument", "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HttpError(400, "invalid_argument", "the JSON body must be an object")
        if "image_base64" not in body:
            raise HttpError(400, "invalid_argument", "JSON field 'image_base64' (the image) is required")
        return ImageRequest(decode_base64(body["image_base64"], "image_base64"), body)
    raise HttpError(415, "unsupported_media_type",
                    "send multipart/form-data with a 'file' field, or application/json with 'image_base64'")
