"""Reading requests in any of their input styles (multipart `file`, or JSON
`image_base64`), their parameters and pipeline steps, with clear 4xx errors."""
from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from fastapi import Request
from starlette.datastructures import UploadFile

from imagemesh.v1 import pipeline_pb2

from .errors import HttpError

# Base64 grows data by 4/3; JSON and multipart add a little framing.
_ENVELOPE_FACTOR, _ENVELOPE_SLACK = 1.4, 64 * 1024
MAX_STEPS = 16
ALPHA_MODES = {"lanczos": pipeline_pb2.ALPHA_MODE_LANCZOS, "model": pipeline_pb2.ALPHA_MODE_MODEL}
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


def bad(message: str) -> HttpError:
    return HttpError(400, "invalid_argument", message)


class Fields:
    """Typed reads of request fields (form strings or JSON values); `where` prefixes messages."""

    def __init__(self, values: dict[str, Any], where: str = ""):
        self.values, self.where = values, where

    def _name(self, name: str) -> str:
        return f"{self.where}{name}"

    def text(self, name: str, default: str, choices: tuple[str, ...] | None = None,
             aliases: dict[str, str] | None = None) -> str:
        value = self.values.get(name)
        if value is None or value == "":
            return default
        if not isinstance(value, str):
            raise bad(f"{self._name(name)} must be a string")
        value = value.strip()
        value = (aliases or {}).get(value.lower(), value)
        if choices is not None:
            if value.lower() not in choices:
                raise bad(f"{self._name(name)} must be one of {', '.join(choices)}; got {value!r}")
            return value.lower()
        return value

    def number(self, name: str, default: float, *, integer: bool = False,
               minimum: float | None = None, maximum: float | None = None) -> float:
        value = self.values.get(name)
        if value is None or value == "":
            return default
        kind = "an integer" if integer else "a number"
        if isinstance(value, bool):
            raise bad(f"{self._name(name)} must be {kind}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad(f"{self._name(name)} must be {kind}; got {value!r}") from None
        if not math.isfinite(number) or (integer and not number.is_integer()):
            raise bad(f"{self._name(name)} must be {kind}; got {value!r}")
        if minimum is not None and number < minimum or maximum is not None and number > maximum:
            bounds = " and ".join(text for text in (minimum is not None and f"at least {minimum:g}",
                                                    maximum is not None and f"at most {maximum:g}") if text)
            raise bad(f"{self._name(name)} must be {bounds}; got {value}")
        return int(number) if integer else number

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.values.get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
            return value.strip().lower() in TRUE
        raise bad(f"{self._name(name)} must be true or false; got {value!r}")

    def structured(self, name: str, default: Any = None) -> Any:
        """A JSON value, given as JSON in a form field or directly in a JSON body."""
        value = self.values.get(name, default)
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise bad(f"{self._name(name)} is not valid JSON") from None
        return value

    def names(self, name: str) -> list[str]:
        """A list of names: a JSON list, or comma-separated."""
        value = self.values.get(name)
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
    if declared and declared.isdigit() and int(declared) > max_bytes * _ENVELOPE_FACTOR + _ENVELOPE_SLACK:
        raise HttpError(413, "upload_too_large", f"the request is {declared} bytes; images may be {max_bytes} bytes")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_files=2, max_fields=64)
        except Exception:
            raise bad("the multipart body is malformed") from None
        fields = Fields({k: v for k, v in form.items() if isinstance(v, str)})
        upload = form.get("file")
        if isinstance(upload, UploadFile):
            return ImageRequest(await upload.read(max_bytes + 1), fields)
        if fields.values.get("image_url"):
            return ImageRequest(await fetch_url(fields.text("image_url", "")), fields)
        raise bad("multipart field 'file' (the image) or 'image_url' is required")
    if content_type == "application/json":
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise bad("the body is not valid JSON") from None
        return await image_from_json(body, fetch_url, base64_fields)
    raise HttpError(415, "unsupported_media_type",
                    "send multipart/form-data with a 'file' field, or application/json with "
                    f"{' or '.join(repr(f) for f in base64_fields)} or 'image_url'")


async def image_from_json(body: Any, fetch_url: Callable[[str], Awaitable[bytes]],
                          base64_fields: tuple[str, ...]) -> ImageRequest:
    if not isinstance(body, dict):
        raise bad("the JSON body must be an object")
    fields = Fields(body)
    for name in base64_fields:
        if name in body:
            return ImageRequest(decode_base64(body[name], name), fields)
    if body.get("image_url"):
        return ImageRequest(await fetch_url(fields.text("image_url", "")), fields)
    raise bad(f"JSON field {' or '.join(repr(f) for f in base64_fields)} (the image, base64) or 'image_url' is required")


# --- steps ----------------------------------------------------------------

def upscale_step(f: Fields) -> pipeline_pb2.Step:
    return pipeline_pb2.Step(upscale=pipeline_pb2.UpscaleOptions(
        model=f.text("model", "auto"), scale=f.number("scale", 4.0),
        tile_size=f.number("tile", 0, integer=True, minimum=0, maximum=4096),
        alpha_mode=ALPHA_MODES[f.text("alpha", "lanczos", tuple(ALPHA_MODES))]))


def remove_background_options(f: Fields, models: list[str] | None = None) -> pipeline_pb2.RemoveBackgroundOptions:
    return pipeline_pb2.RemoveBackgroundOptions(
        model=f.text("model", "auto"), models=models or [], only_mask=f.boolean("only_mask"),
        bgcolor=f.text("bgcolor", ""), post_process=f.boolean("post_process"), refine=f.boolean("refine"),
        alpha_matting=f.boolean("alpha_matting"), bypass_cache=not f.boolean("use_cache", True),
        keyer_tolerance=f.number("tolerance", 0, integer=True, minimum=0, maximum=255),
        keyer_all_similar=f.boolean("all_similar"))


def effect_step(f: Fields, params: Any) -> pipeline_pb2.Step:
    """Numbers (and booleans) are parameters, strings are named options."""
    effect = f.text("effect", "")
    if not effect:
        raise bad(f"{f.where}effect is required")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise bad(f"{f.where}params must be an object")
    numbers, options = {}, {}
    for key, value in params.items():
        if isinstance(value, bool):
            numbers[key] = float(value)
        elif isinstance(value, (int, float)):
            numbers[key] = float(value)
        elif isinstance(value, str):
            try:
                numbers[key] = float(value)
            except ValueError:
                options[key] = value
        else:
            raise bad(f"{f.where}params.{key} must be a number or a string")
    return pipeline_pb2.Step(effect=pipeline_pb2.EffectOptions(effect=effect, params=numbers, options=options))


def parse_steps(value: Any) -> list[pipeline_pb2.Step]:
    """`steps`: [{"op": "remove_background", ...}, {"op": "upscale", "scale": 4}, {"op": "effect", ...}]."""
    if not isinstance(value, list) or not value:
        raise bad("steps must be a non-empty JSON list of steps")
    if len(value) > MAX_STEPS:
        raise bad(f"steps may hold at most {MAX_STEPS} steps, got {len(value)}")
    steps = []
    for index, raw in enumerate(value):
        if not isinstance(raw, dict):
            raise bad(f"steps[{index}] must be an object")
        f = Fields(raw, f"steps[{index}].")
        op = f.text("op", "", ("upscale", "remove_background", "effect"))
        if op == "upscale":
            steps.append(upscale_step(f))
        elif op == "remove_background":
            steps.append(pipeline_pb2.Step(remove_background=remove_background_options(f)))
        elif op == "effect":
            steps.append(effect_step(f, raw.get("params")))
        else:
            raise bad(f"steps[{index}].op is required: upscale, remove_background or effect")
    return steps
