"""Pipeline steps as the HTTP API and the client library write them in JSON
(`{"op": "upscale", "scale": 4}`): their fields, declared once, and how they
are read into the protobuf Steps the mesh runs."""

from __future__ import annotations

from typing import Any

from imagemesh.v1 import pipeline_pb2
from PIL import ImageColor

from .contract import MAX_KEYER_TOLERANCE, MAX_SCALE, MAX_STEPS, MAX_TILE_SIZE, MIN_SCALE, MIN_TILE_SIZE
from .failures import bad
from .fields import Field, Fields, group, read

_BYTE = r"(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])"  # 0 to 255, as the r,g,b colour form takes
# Marks a schema that the effects catalogue (GET /v1/effects) makes precise (the gateway fills it in).
CATALOGUE = "x-imagemesh-catalogue"

UPSCALE = group(
    Field("scale", "number", "upscale factor", default=4.0, minimum=MIN_SCALE, maximum=MAX_SCALE),
    Field("model", "string", "auto, or a model name from GET /v1/models", default="auto"),
    Field(
        "tile",
        "integer",
        f"inference tile edge: 0 for the service's choice (timed at start), else {MIN_TILE_SIZE} to {MAX_TILE_SIZE}",
        default=0,
        minimum=MIN_TILE_SIZE,
        maximum=MAX_TILE_SIZE,
        also=(0,),
    ),
    Field("alpha", "string", "how alpha is upscaled", default="lanczos", choices=("lanczos", "model")),
)
REMOVE = group(
    Field(
        "model",
        "string",
        "auto (the best ready general model, else the keyer), or a name from GET /v1/models",
        default="auto",
    ),
    Field("only_mask", "boolean", "answer the mask alone", default=False),
    Field(
        "bgcolor",
        "string",
        "composite on this colour: #rrggbb, #rgb, r,g,b or a CSS name; empty for none",
        default="",
        value_schema={
            "anyOf": [
                {"enum": ["", *sorted(ImageColor.colormap)]},
                {"pattern": "^#([0-9a-fA-F]{3}){1,2}$"},
                {"pattern": rf"^{_BYTE}\s*,\s*{_BYTE}\s*,\s*{_BYTE}$"},
            ]
        },
    ),
    Field("post_process", "boolean", "binary clean-up of the mask", default=False),
    Field("refine", "boolean", "guided-filter edge refinement", default=False),
    Field("alpha_matting", "boolean", "closed-form matting (slow)", default=False),
    Field("use_cache", "boolean", "answer a cached cut-out of the same image and options", default=True),
    Field(
        "tolerance",
        "integer",
        "keyer: colour distance to the background; 0 for its default (32)",
        default=0,
        minimum=0,
        maximum=MAX_KEYER_TOLERANCE,
    ),
    Field("all_similar", "boolean", "keyer: also remove enclosed areas of the background colour", default=False),
)
CANDIDATES = Field("models", "names", "several models at once: the answer is JSON with one candidate each")
EFFECT = group(
    Field("effect", "string", "an effect name from GET /v1/effects", value_schema={"minLength": 1}),
    Field(
        "params",
        "json",
        "the effect's parameters (numbers) and options (strings), as GET /v1/effects lists them",
        value_schema={"type": "object", "additionalProperties": {"type": ["number", "string", "boolean"]}},
    ),
)
STEP_SCHEMA = {
    "type": "object",
    "required": ["op"],
    CATALOGUE: "step",
    "oneOf": [
        {"properties": {"op": {"const": "upscale"}, **{name: f.schema() for name, f in UPSCALE.items()}}},
        {"properties": {"op": {"const": "remove_background"}, **{name: f.schema() for name, f in REMOVE.items()}}},
        {
            "required": ["effect"],
            "properties": {"op": {"const": "effect"}, **{name: f.schema() for name, f in EFFECT.items()}},
        },
    ],
}
STEPS = Field(
    "steps",
    "json",
    'the steps, run in order, e.g. [{"op": "remove_background", "model": "keyer"}, '
    '{"op": "upscale", "scale": 4}, {"op": "effect", "effect": "blackwhite"}]',
    value_schema={"type": "array", "items": STEP_SCHEMA, "minItems": 1, "maxItems": MAX_STEPS},
)

ALPHA_MODES = {"lanczos": pipeline_pb2.ALPHA_MODE_LANCZOS, "model": pipeline_pb2.ALPHA_MODE_MODEL}
STEP_OPS = ("upscale", "remove_background", "effect")


def upscale_step(f: Fields) -> pipeline_pb2.Step:
    v = read(f, UPSCALE)
    return pipeline_pb2.Step(
        upscale=pipeline_pb2.UpscaleOptions(
            model=v["model"], scale=v["scale"], tile_size=v["tile"], alpha_mode=ALPHA_MODES[v["alpha"]]
        )
    )


def remove_background_options(f: Fields, models: list[str] | None = None) -> pipeline_pb2.RemoveBackgroundOptions:
    v = read(f, REMOVE)
    return pipeline_pb2.RemoveBackgroundOptions(
        model=v["model"],
        models=models or [],
        only_mask=v["only_mask"],
        bgcolor=v["bgcolor"],
        post_process=v["post_process"],
        refine=v["refine"],
        alpha_matting=v["alpha_matting"],
        bypass_cache=not v["use_cache"],
        keyer_tolerance=v["tolerance"],
        keyer_all_similar=v["all_similar"],
    )


def effect_step(f: Fields, params: Any = None, *, loose: bool = False) -> pipeline_pb2.Step:
    """Numbers are parameters, strings named options. `params` given here stand in for
    the `params` field; `loose`: they are a form's own fields, text that may be a number."""
    effect = EFFECT["effect"].read(f)
    if not effect:
        raise bad(f"{f.where}effect is required")
    if params is None:
        params = EFFECT["params"].read(f)
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise bad(f"{f.where}params must be an object")
    numbers, options = {}, {}
    for key, value in params.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers[key] = float(value)
        elif isinstance(value, str) and loose and _is_number(value):
            numbers[key] = float(value)
        elif isinstance(value, str):
            options[key] = value
        else:
            raise bad(f"{f.where}params.{key} must be a number (a parameter) or a string (an option)")
    return pipeline_pb2.Step(effect=pipeline_pb2.EffectOptions(effect=effect, params=numbers, options=options))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_steps(f: Fields) -> list[pipeline_pb2.Step]:
    """`steps`: [{"op": "remove_background", ...}, {"op": "upscale", "scale": 4}, {"op": "effect", ...}]."""
    value = STEPS.read(f)
    limit = MAX_STEPS
    if not isinstance(value, list) or not value:
        raise bad("steps must be a non-empty JSON list of steps")
    if len(value) > limit:
        raise bad(f"steps may hold at most {limit} steps, got {len(value)}")
    steps = []
    for index, raw in enumerate(value):
        if not isinstance(raw, dict):
            raise bad(f"steps[{index}] must be an object")
        step = Fields(raw, f"steps[{index}].")
        op = step.text("op", "", STEP_OPS)
        if op == "upscale":
            steps.append(upscale_step(step))
        elif op == "remove_background":
            steps.append(pipeline_pb2.Step(remove_background=remove_background_options(step)))
        elif op == "effect":
            steps.append(effect_step(step))
        else:
            raise bad(f"steps[{index}].op is required: {', '.join(STEP_OPS)}")
    return steps
