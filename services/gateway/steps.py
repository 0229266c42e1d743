"""Pipeline steps from request fields, read as services/gateway/fields.py declares them."""
from __future__ import annotations

from typing import Any

from imagemesh.v1 import pipeline_pb2

from .fields import EFFECT, REMOVE, STEPS, UPSCALE, read
from .inputs import Fields, bad

ALPHA_MODES = {"lanczos": pipeline_pb2.ALPHA_MODE_LANCZOS, "model": pipeline_pb2.ALPHA_MODE_MODEL}
STEP_OPS = ("upscale", "remove_background", "effect")


def upscale_step(f: Fields) -> pipeline_pb2.Step:
    v = read(f, UPSCALE)
    return pipeline_pb2.Step(upscale=pipeline_pb2.UpscaleOptions(
        model=v["model"], scale=v["scale"], tile_size=v["tile"], alpha_mode=ALPHA_MODES[v["alpha"]]))


def remove_background_options(f: Fields, models: list[str] | None = None) -> pipeline_pb2.RemoveBackgroundOptions:
    v = read(f, REMOVE)
    return pipeline_pb2.RemoveBackgroundOptions(
        model=v["model"], models=models or [], only_mask=v["only_mask"], bgcolor=v["bgcolor"],
        post_process=v["post_process"], refine=v["refine"], alpha_matting=v["alpha_matting"],
        bypass_cache=not v["use_cache"], keyer_tolerance=v["tolerance"], keyer_all_similar=v["all_similar"])


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
    limit = STEPS.value_schema["maxItems"]
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
