"""Reading requests in any of their input styles (multipart `file`, or JSON
`image_base64`), their parameters and pipeline steps, with clear 4xx errors."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import jsonschema
from fastapi import Request
from starlette.datastructures import UploadFile

from services.common.fields import Fields, load_json

from .errors import HttpError, bad

# Base64 grows data by 4/3; JSON and multipart add a little framing.
_ENVELOPE_FACTOR, _ENVELOPE_SLACK = 1.4, 64 * 1024
SMALL_BODY_BYTES = 64 * 1024  # routes that take no image


def body_limit(max_upload_bytes: int) -> int:
    """The most a request carrying an image of `max_upload_bytes` may send, framing included."""
    return int(max_upload_bytes * _ENVELOPE_FACTOR + _ENVELOPE_SLACK)


@dataclass
class ImageRequest:
    data: bytes
    fields: Fields


def check_json(value: Any, schema: dict, name: str) -> None:
    """A JSON value checked against its documented schema: a 400 naming the first problem."""
    try:
        error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(value))
    except RecursionError:
        raise bad(f"{name} is nested too deeply") from None
    if error is not None:
        where = ".".join(str(part) for part in (name, *error.absolute_path))
        raise bad(f"{where}: {error.message[:200]}")


def decode_base64(text: Any, field: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise bad(f"{field} must be a non-empty base64 string")
    if text.startswith("data:") and "," in text:  # data URL
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{field} is not valid base64") from None


async def read_image_request(
    request: Request,
    max_bytes: int,
    fetch_url: Callable[[str], Awaitable[bytes]],
    base64_fields: tuple[str, ...] = ("image_base64",),
) -> ImageRequest:
    """The image (an upload, base64 in JSON, or `image_url`) and the request's other fields."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > body_limit(max_bytes):
        raise HttpError(413, "upload_too_large", f"the request is {declared} bytes; images may be {max_bytes} bytes")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_files=2, max_fields=64)
        except HttpError:
            raise  # over the body limit (RequestContext)
        except Exception:
            raise bad("the multipart body is malformed") from None
        fields = Fields({k: v for k, v in form.items() if isinstance(v, str)}, form=True)
        upload = form.get("file")
        one_source(fields.values, ("file",), isinstance(upload, UploadFile))
        if isinstance(upload, UploadFile):
            return ImageRequest(await upload.read(max_bytes + 1), fields)
        return ImageRequest(await fetch_url(fields.text("image_url", "")), fields)
    if content_type == "application/json":
        return await image_from_json(load_json(await request.body(), "the body"), fetch_url, base64_fields)
    raise HttpError(
        415,
        "unsupported_media_type",
        "send multipart/form-data with a 'file' field, or application/json with "
        f"{' or '.join(repr(f) for f in base64_fields)} or 'image_url'",
    )


async def image_from_json(
    body: Any, fetch_url: Callable[[str], Awaitable[bytes]], base64_fields: tuple[str, ...]
) -> ImageRequest:
    if not isinstance(body, dict):
        raise bad("the JSON body must be an object")
    fields = Fields(body)
    one_source(body, base64_fields)
    for name in base64_fields:
        if name in body:
            return ImageRequest(decode_base64(body[name], name), fields)
    return ImageRequest(await fetch_url(fields.text("image_url", "")), fields)


def one_source(values: dict, image_fields: tuple[str, ...], uploaded: bool = False) -> None:
    """Exactly one of the image fields, or image_url: a request with two would be ambiguous."""
    given = [name for name in (*image_fields, "image_url") if name in values or name == "file" and uploaded]
    if len(given) != 1:
        names = " or ".join(repr(name) for name in (*image_fields, "image_url"))
        raise bad(f"send the image in exactly one of {names}" + (f"; got {', '.join(given)}" if given else ""))
