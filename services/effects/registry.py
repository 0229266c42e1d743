"""The effects catalogue: each effect's name, parameters (with ranges), named
choices, how many context pixels it needs (halo) or that it needs the whole
image, and whether its output is grey, colour or the same as its input. The
API schema, `GET /v1/effects`, the web page's sliders and the CLI read it
through ListEffects."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from services.common.errors import InvalidArgument, quoted

from .engine import (
    PIXEL_PALETTES,
    Origin,
    adjust,
    blackwhite,
    blur,
    dither,
    grayscale,
    invert,
    kernel_radius,
    pixel8bit,
    pixelate,
    popart,
    posterize,
    sepia,
    sharpen,
    vignette,
)


@dataclass(frozen=True)
class Param:
    name: str
    default: float
    minimum: float
    maximum: float
    description: str
    integer: bool = False


@dataclass(frozen=True)
class Choice:
    name: str
    default: str
    values: tuple[str, ...]
    description: str


Apply = Callable[[np.ndarray, Origin, dict, dict], np.ndarray]


@dataclass(frozen=True)
class Effect:
    name: str
    description: str
    apply: Apply
    params: tuple[Param, ...] = ()
    choices: tuple[Choice, ...] = ()
    output: str | Callable[[dict], str] = "same"  # "grey", "colour" or "same" (or a function of the options)
    halo: Callable[[dict, dict], int] = field(default=lambda p, o: 0)
    whole_image: Callable[[dict, dict], bool] = field(default=lambda p, o: False)
    scale: Callable[[dict, dict], int] = field(default=lambda p, o: 1)  # output size multiple (pop-art grid)
    eight_bit: bool = False  # output is palette values, stored as 8-bit

    def output_kind(self, options: dict) -> str:
        return self.output(options) if callable(self.output) else self.output

    def resolve(self, params: dict[str, float], options: dict[str, str]) -> tuple[dict, dict]:
        """Defaults filled in, names and ranges checked."""
        known = {p.name: p for p in self.params}
        unknown = sorted(set(params) - set(known))
        if unknown:
            valid = ", ".join(known) or "none"
            raise InvalidArgument(
                f"{self.name} has no parameter {', '.join(unknown)}; valid parameters: {valid}", field="params"
            )
        resolved = {}
        for p in self.params:
            value = float(params.get(p.name, p.default))
            if not math.isfinite(value) or not p.minimum <= value <= p.maximum:
                raise InvalidArgument(
                    f"{self.name}.{p.name} must be between {p.minimum:g} and {p.maximum:g}, got {value:g}",
                    field=f"params.{p.name}",
                )
            if p.integer and not value.is_integer():
                raise InvalidArgument(
                    f"{self.name}.{p.name} must be a whole number, got {value:g}", field=f"params.{p.name}"
                )
            resolved[p.name] = value
        choices = {c.name: c for c in self.choices}
        unknown = sorted(set(options) - set(choices))
        if unknown:
            raise InvalidArgument(
                f"{self.name} has no option {', '.join(unknown)}; valid options: {', '.join(choices) or 'none'}",
                field="options",
            )
        chosen: dict[str, str] = {}
        for c in self.choices:
            choice = options.get(c.name, c.default).lower()
            if choice not in c.values:
                raise InvalidArgument(
                    f"{self.name}.{c.name} must be one of {', '.join(c.values)}, got {quoted(choice)}",
                    field=f"options.{c.name}",
                )
            chosen[c.name] = choice
        return resolved, chosen


EFFECTS: dict[str, Effect] = {
    e.name: e
    for e in (
        Effect(
            "blackwhite",
            "film black and white: Tri-X response, gamma, contrast, edges, halation and grain",
            blackwhite,
            (
                Param("gamma_correction", 1.02, 0.2, 5.0, "gamma applied to the film response"),
                Param("contrast_boost", 1.12, 0.0, 3.0, "contrast around mid grey"),
                Param("edge_strength", 0.9, 0.0, 3.0, "local edge enhancement"),
                Param("halation_strength", 0.12, 0.0, 1.0, "glow around highlights"),
                Param("halation_radius", 8, 1, 48, "glow radius in pixels", integer=True),
                Param("grain_strength", 0.08, 0.0, 1.0, "film grain amount"),
                Param("grain_seed", 0, 0, 2**31 - 1, "grain pattern", integer=True),
            ),
            output="grey",
            halo=lambda p, o: kernel_radius(1.0) + kernel_radius(p["halation_radius"] / 3.0),
        ),
        Effect(
            "dither",
            "Floyd-Steinberg error diffusion onto a small palette",
            dither,
            (
                Param("levels", 2, 2, 6, "levels per channel (grey or rgb palettes)", integer=True),
                Param("dot_spacing", 1, 1, 16, "dither on a grid of this many pixels (bigger dots)", integer=True),
            ),
            (Choice("palette", "bw", ("bw", "grey", "rgb"), "black and white, grey levels, or RGB levels"),),
            output=lambda o: "colour" if o["palette"] == "rgb" else "grey",
            whole_image=lambda p, o: True,
            eight_bit=True,
        ),
        Effect(
            "popart",
            "pop art: BT.709 luminance posterised into bold colour blocks",
            popart,
            (Param("levels", 4, 2, 6, "colour blocks per picture", integer=True),),
            (Choice("grid", "off", ("off", "2x2"), "a 2x2 grid in four palettes (doubles the size)"),),
            output="colour",
            whole_image=lambda p, o: o["grid"] == "2x2",
            scale=lambda p, o: 2 if o["grid"] == "2x2" else 1,
            eight_bit=True,
        ),
        Effect(
            "pixel8bit",
            "8-bit look: pixel blocks mapped to a retro palette",
            pixel8bit,
            (Param("block", 8, 2, 64, "pixel block size", integer=True),),
            (Choice("palette", "pico8", tuple(PIXEL_PALETTES), "retro palette"),),
            output="colour",
            halo=lambda p, o: int(p["block"]) - 1,
            eight_bit=True,
        ),
        Effect(
            "pixelate",
            "pixel blocks in their mean colour",
            pixelate,
            (Param("block", 8, 2, 128, "pixel block size", integer=True),),
            halo=lambda p, o: int(p["block"]) - 1,
        ),
        Effect(
            "sepia",
            "warm sepia toning",
            sepia,
            (Param("strength", 1.0, 0.0, 1.0, "mix with the original"),),
            output="colour",
        ),
        Effect(
            "posterize",
            "fewer levels per channel",
            posterize,
            (Param("levels", 4, 2, 64, "levels per channel", integer=True),),
        ),
        Effect("grayscale", "BT.709 luminance", grayscale, output="grey"),
        Effect("invert", "negative", invert),
        Effect(
            "adjust",
            "brightness, contrast, saturation and gamma",
            adjust,
            (
                Param("brightness", 0.0, -1.0, 1.0, "added to every channel"),
                Param("contrast", 1.0, 0.0, 3.0, "around mid grey"),
                Param("saturation", 1.0, 0.0, 3.0, "0 is grey"),
                Param("gamma", 1.0, 0.2, 5.0, "above 1 brightens the midtones"),
            ),
        ),
        Effect(
            "blur",
            "Gaussian blur",
            blur,
            (Param("radius", 2.0, 0.3, 25.0, "sigma in pixels"),),
            halo=lambda p, o: kernel_radius(p["radius"]),
        ),
        Effect(
            "sharpen",
            "unsharp mask",
            sharpen,
            (
                Param("amount", 1.0, 0.0, 5.0, "strength"),
                Param("radius", 1.0, 0.3, 10.0, "sigma in pixels"),
            ),
            halo=lambda p, o: kernel_radius(p["radius"]),
        ),
        Effect(
            "vignette",
            "darkened corners",
            vignette,
            (
                Param("strength", 0.5, 0.0, 1.0, "darkening at the corners"),
                Param("radius", 1.0, 0.2, 3.0, "where darkening starts, relative to the half diagonal"),
            ),
        ),
    )
}


def get(name: str) -> Effect:
    effect = EFFECTS.get(name)
    if effect is None:
        raise InvalidArgument(f"unknown effect {quoted(name)}; valid effects: {', '.join(EFFECTS)}", field="effect")
    return effect
