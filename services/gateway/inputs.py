"""Reading requests in any of their input styles (multipart `file`, or JSON
`image_base64`), their parameters and pipeline steps, with clear 4xx errors."""
from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import jsonschema
from fastapi import Request
from starlette.datastructures import UploadFile

from services.common.errors import quoted

from .errors import HttpError

# Base64 grows data by 4/3; JSON and multipart add a little framing.
_ENVELOPE_FACTOR, _ENVELOPE_SLACK = 1.4, 64 * 1024
SMALL_BODY_BYTES = 64 * 1024  # routes that take no image


def body_limit(max_upload_bytes: int) -> int:
    """The most a request carrying an image of `max_upload_bytes` may send, framing included."""
    return int(max_upload_bytes * _ENVELOPE_FACTOR + _ENVELOPE_SLACK)
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


def bad(message: str) -> HttpError:
    return HttpError(400, "invalid_argument", message)


def load_json(text: str | bytes, what: str) -> Any:
    """Parse JSON from a client: a 400 for anything that is not (nesting too deep included)."""
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise bad(f"{what} is not valid JSON") from None
    except RecursionError:
        raise bad(f"{what} is nested too deeply") from None


class Fields:
    """Typed reads of request fields; `where` prefixes messages. A form's values are
    text ("4", "true"); a JSON body's carry their own types, which must be right."""

    def __init__(self, values: dict[str, Any], where: str = "", *, form: bool = False):
        self.values, self.where, self.form = values, where, form

    def _name(self, name: str) -> str:
        return f"{self.where}{name}"

    def _get(self, name: str) -> Any:
        """The given value; None when absent. JSON's null is not a value of any field."""
        value = self.values.get(name)
        if value is None and name in self.values:
            raise bad(f"{self._name(name)} must not be null; leave it out for its default")
        return value

    def text(self, name: str, default: str, choices: tuple[str, ...] | None = None,
             aliases: dict[str, str] | None = None) -> str:
        value = self._get(name)
        if value is None or value == "":
            return default
        if not isinstance(value, str):
            raise bad(f"{self._name(name)} must be a string")
        value = value.strip()
        value = (aliases or {}).get(value.lower(), value)
        if choices is not None:
            if value.lower() not in choices:
                raise bad(f"{self._name(name)} must be one of {', '.join(choices)}; got {quoted(value)}")
            return value.lower()
        return value

    def number(self, name: str, default: float, *, integer: bool = False, minimum: float | None = None,
               maximum: float | None = None, also: tuple[float, ...] = ()) -> float:
        value = self._get(name)
        if value is None or value == "":
            return default
        kind = "an integer" if integer else "a number"
        if isinstance(value, bool) or isinstance(value, str) and not self.form:
            raise bad(f"{self._name(name)} must be {kind}; got {quoted(value)}")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise bad(f"{self._name(name)} must be {kind}; got {quoted(value)}") from None
        if not math.isfinite(number) or (integer and not number.is_integer()):
            raise bad(f"{self._name(name)} must be {kind}; got {quoted(value)}")
        if number not in also and (minimum is not None and number < minimum or
                                   maximum is not None and number > maximum):
            bounds = " and ".join(text for text in (minimum is not None and f"at least {minimum:g}",
                                                    maximum is not None and f"at most {maximum:g}") if text)
            alternatives = "".join(f"{v:g} or " for v in also)
            raise bad(f"{self._name(name)} must be {alternatives}{bounds}; got {value}")
        return int(number) if integer else number

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if self.form and isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
            return value.strip().lower() in TRUE
        raise bad(f"{self._name(name)} must be true or false; got {quoted(value)}")

    def structured(self, name: str, default: Any = None) -> Any:
        """A JSON value: JSON text in a form field, the value itself in a JSON body."""
        value = self._get(name)
        if value is None or value == "" and self.form:  # absent, or an empty form field: none given
            return default
        if isinstance(value, str) and self.form:
            return load_json(value, self._name(name))
        return value

    def names(self, name: str) -> list[str]:
        """A list of names: a JSON list, or comma-separated."""
        value = self._get(name)
        if value is None or value == "":
            return []
        if isinstance(value, str) and value.strip().startswith("["):
            value = self.structured(name)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise bad(f"{self._name(name)} must be a list of names")
        return value


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


async def read_image_request(request: Request, max_bytes: int, fetch_url: Callable[[str], Awaitable[bytes]],
                             base64_fields: tuple[str, ...] = ("image_base64",)) -> ImageRequest:
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
    raise HttpError(415, "unsupported_media_type",
                    "send multipart/form-data with a 'file' field, or application/json with "
                    f"{' or '.join(repr(f) for f in base64_fields)} or 'image_url'")


async def image_from_json(body: Any, fetch_url: Callable[[str], Awaitable[bytes]],
                          base64_fields: tuple[str, ...]) -> ImageRequest:
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
