"""Every request field of the HTTP API, declared once: its type, default, range
and description. The parser (`Field.read`) and the OpenAPI schema
(`Field.schema`, `image_body`) both come from these declarations (the steps'
own in services/common/steps.py), and the limits the services enforce come
from services.common.contract."""

from __future__ import annotations

from typing import Any

from services.common.fields import Field, group
from services.common.steps import CANDIDATES, CATALOGUE, EFFECT, REMOVE, STEPS, UPSCALE

__all__ = ["CANDIDATES", "CATALOGUE", "EFFECT", "REMOVE", "STEPS", "UPSCALE"]  # the steps' fields, for the routes

FORMAT_CHOICES = ("auto", "png", "jpeg", "webp")


FORMAT = Field(
    "format",
    "string",
    "output format; auto keeps the input's, PNG when alpha would be lost",
    default="auto",
    choices=FORMAT_CHOICES,
    aliases=(("jpg", "jpeg"),),
)
QUALITY = Field("quality", "integer", "JPEG and WebP quality", default=92, minimum=1, maximum=100)
OUTPUT = group(FORMAT, QUALITY)

IMAGE_FILE = {"type": "string", "format": "binary", "minLength": 1, "description": "the image"}
IMAGE_BASE64 = {
    "type": "string",
    "format": "byte",
    "minLength": 1,
    "description": "the image, base64 (a data: URL is fine)",
}
IMAGE_URL = {
    "type": "string",
    "format": "uri",
    "pattern": "^https?://",
    "description": "fetch the image from a public http(s) URL instead",
}


def image_body(
    fields: dict[str, Field],
    required: tuple[str, ...] = (),
    *,
    base64_fields: tuple[str, ...] = ("image_base64",),
    forms: bool = True,
    catalogue: str | None = None,
) -> dict:
    """The OpenAPI request body of an image route: multipart (`file`) or JSON
    (`image_base64`), either with `image_url` instead; exactly one image source.
    `catalogue` marks the body for `complete`."""

    def body(image_fields: dict, in_form: bool) -> dict:
        sources = [*image_fields, "image_url"]
        schema = {
            "type": "object",
            "properties": {
                **image_fields,
                "image_url": IMAGE_URL,
                **{name: f.schema(in_form) for name, f in fields.items()},
            },
            "required": list(required),
            "oneOf": [{"required": [source]} for source in sources],
        }
        return {**schema, CATALOGUE: catalogue} if catalogue else schema

    content: dict[str, Any] = {
        "application/json": {"schema": body({name: IMAGE_BASE64 for name in base64_fields}, False)}
    }
    if forms:
        encoding = {name: {"contentType": "application/json"} for name, f in fields.items() if f.kind == "json"}
        form = {"schema": body({"file": IMAGE_FILE}, True), **({"encoding": encoding} if encoding else {})}
        content = {"multipart/form-data": form, **content}
    return {"required": True, "content": content}


# --- answers --------------------------------------------------------------------

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "request_id"],
            "properties": {
                "code": {"type": "string", "description": "a stable reason, e.g. invalid_argument, model_not_found"},
                "message": {"type": "string"},
                "request_id": {"type": "string"},
            },
        }
    },
}
STEP_REPORT_SCHEMA = {
    "type": "object",
    "properties": {
        "op": {"type": "string"},
        "name": {"type": "string"},
        "backend": {"type": "string"},
        "service": {"type": "string"},
        "tiles": {"type": "integer"},
        "compute_ms": {"type": "number"},
        "total_ms": {"type": "number"},
        "cache_hit": {"type": "boolean"},
        "details": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
IMAGE_JSON_SCHEMA = {
    "type": "object",
    "required": ["image_base64", "width", "height", "format", "steps"],
    "properties": {
        "image_base64": {"type": "string"},
        "width": {"type": "integer"},
        "height": {"type": "integer"},
        "format": {"type": "string"},
        "model": {"type": "string"},
        "backend": {"type": "string"},
        "scale": {"type": "number"},
        "steps": {"type": "array", "items": STEP_REPORT_SCHEMA},
        "timings_ms": {"type": "object", "additionalProperties": {"type": "number"}},
    },
}
IMAGE_TYPES = {
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "image/webp": {"schema": {"type": "string", "format": "binary"}},
}
_ERROR_TEXT = {
    400: "a bad parameter",
    401: "missing or wrong bearer token",
    404: "unknown model or resource",
    405: "method not allowed",
    409: "not done yet",
    413: "image, upload or output over a limit",
    415: "a media type or image format the API does not take",
    422: "not a decodable image",
    429: "rate limited or busy; see Retry-After",
    502: "a service ended its answer early",
    503: "model not ready or a service unavailable; see Retry-After",
    504: "a service did not answer in time",
}
PROCESSING_ERRORS = (400, 401, 404, 413, 415, 422, 429, 502, 503, 504)


def errors(*statuses: int) -> dict:
    """Documented error answers: the JSON error body."""
    return {
        status: {"description": _ERROR_TEXT[status], "content": {"application/json": {"schema": ERROR_SCHEMA}}}
        for status in statuses
    }


def json_answer(description: str, schema: dict | None = None) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema or {"type": "object"}}}}


IMAGE_ANSWER = {
    200: {
        "description": "the image; JSON with `Accept: application/json`",
        "content": {**IMAGE_TYPES, "application/json": {"schema": IMAGE_JSON_SCHEMA}},
    },
    **errors(*PROCESSING_ERRORS),
}
CANDIDATES_SCHEMA = {
    "type": "object",
    "required": ["request_id", "candidates"],
    "properties": {
        "request_id": {"type": "string"},
        "candidates": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "model": {"type": "string"},
                    "backend": {"type": "string"},
                    "compute_ms": {"type": "number"},
                    "cache_hit": {"type": "boolean"},
                    "width": {"type": "integer"},
                    "height": {"type": "integer"},
                    "format": {"type": "string"},
                    "image_base64": {"type": "string"},
                },
            },
        },
        "timings_ms": {"type": "object"},
    },
}
REMOVAL_ANSWER = {
    **IMAGE_ANSWER,
    200: {
        "description": "the image; with several models, JSON candidates {request_id, candidates: [...]}",
        "content": {**IMAGE_TYPES, "application/json": {"schema": {"anyOf": [IMAGE_JSON_SCHEMA, CANDIDATES_SCHEMA]}}},
    },
}


# --- the effects catalogue ----------------------------------------------------------


def effect_params_schema(effect: dict) -> dict:
    """One effect's `params`: its parameters (with ranges) and options (with values), nothing else."""
    properties = {
        p["name"]: {
            "type": "integer" if p.get("integer") else "number",
            "minimum": p.get("minimum", 0),
            "maximum": p.get("maximum", 0),
            "default": p.get("default", 0),
            "description": p.get("description", ""),
        }
        for p in effect.get("params", [])
    }
    properties.update(
        {
            o["name"]: {
                "type": "string",
                "enum": o.get("values", []),
                "default": o.get("default", ""),
                "description": o.get("description", ""),
            }
            for o in effect.get("options", [])
        }
    )
    return {"type": "object", "properties": properties, "additionalProperties": False}


def complete(document: Any, effects: list[dict] | None) -> Any:
    """Fill in every CATALOGUE mark of an OpenAPI document from the effects catalogue
    (without one, the generic schemas stay)."""
    if isinstance(document, list):
        return [complete(item, effects) for item in document]
    if not isinstance(document, dict):
        return document
    document = {key: complete(value, effects) for key, value in document.items()}
    mark = document.pop(CATALOGUE, None)
    if mark is None or not effects:
        return document
    names = [e["name"] for e in effects]
    if mark == "step":  # the effect variant becomes one variant per effect
        generic = [v for v in document["oneOf"] if v["properties"]["op"].get("const") != "effect"]
        document["oneOf"] = generic + [
            {
                "required": ["effect"],
                "properties": {
                    "op": {"const": "effect"},
                    "effect": {"const": e["name"]},
                    "params": effect_params_schema(e),
                },
            }
            for e in effects
        ]
    elif mark == "effect-and-params":  # a body with `effect` and `params`
        if "file" in document["properties"]:  # a form may also give them as fields of their own, and nothing else
            fields: dict[str, dict] = {name: {} for name in document["properties"]}
            variants = [
                {
                    "properties": {
                        **fields,
                        "effect": {"const": e["name"]},
                        "params": effect_params_schema(e),
                        **effect_params_schema(e)["properties"],
                    },
                    "additionalProperties": False,
                }
                for e in effects
            ]
        else:
            variants = [
                {"properties": {"effect": {"const": e["name"]}, "params": effect_params_schema(e)}} for e in effects
            ]
        document.setdefault("allOf", []).append({"oneOf": variants})
    elif mark == "effect-name":
        document["enum"] = names
    elif mark == "params-by-effect":
        document["properties"] = {e["name"]: effect_params_schema(e) for e in effects}
        document["additionalProperties"] = False
    return document
