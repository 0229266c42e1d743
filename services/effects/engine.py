"""Effects as pure computation on float32 RGB planes in [0, 1] (each one's
declaration, with its parameters, is in registry.py).

Tileable effects give tiled output equal to untiled output bit for bit: convolutions
here are sums of shifted slices in a fixed order (their result for a pixel
does not depend on the array around it), image borders are mirrored, and
noise is a hash of the pixel's position, not a random stream."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from .registry import Effect

BT709 = np.array([0.2126, 0.7152, 0.0722], np.float32)
# Kodak Tri-X is panchromatic: a little less red and more blue than the eye.
TRI_X = np.array([0.25, 0.62, 0.13], np.float32)


@dataclass(frozen=True)
class Origin:
    """Where an array sits in the image, for position-dependent effects."""

    x: int
    y: int
    width: int  # of the whole image
    height: int


# --- building blocks ------------------------------------------------------


def gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, math.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def kernel_radius(sigma: float) -> int:
    return max(1, math.ceil(3 * sigma))


def convolve_separable(planes: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Mirror-padded separable convolution as shifted-slice sums in a fixed
    order: a pixel's result depends only on its neighbourhood."""
    radius = len(kernel) // 2
    height, width = planes.shape[:2]
    padded = np.pad(planes, ((radius, radius), (0, 0), (0, 0)), mode="symmetric")
    rows = np.zeros_like(planes)
    for i, weight in enumerate(kernel):
        rows += weight * padded[i : i + height]
    padded = np.pad(rows, ((0, 0), (radius, radius), (0, 0)), mode="symmetric")
    out = np.zeros_like(planes)
    for i, weight in enumerate(kernel):
        out += weight * padded[:, i : i + width]
    return out


def gaussian_blur(planes: np.ndarray, sigma: float) -> np.ndarray:
    return convolve_separable(planes, gaussian_kernel(sigma))


def position_noise(origin: Origin, height: int, width: int, seed: int) -> np.ndarray:
    """Triangular noise in [-1, 1] from a hash of each pixel's image position."""
    ys = np.arange(origin.y, origin.y + height, dtype=np.uint32)[:, None]
    xs = np.arange(origin.x, origin.x + width, dtype=np.uint32)[None, :]
    with np.errstate(over="ignore"):
        v = (xs * np.uint32(0x9E3779B1)) ^ (ys * np.uint32(0x85EBCA77)) ^ np.uint32((seed * 0xC2B2AE3D) & 0xFFFFFFFF)
        v ^= v >> np.uint32(16)
        v *= np.uint32(0x85EBCA6B)
        v ^= v >> np.uint32(13)
        v *= np.uint32(0xC2B2AE35)
        v ^= v >> np.uint32(16)
    low = (v & np.uint32(0xFFFF)).astype(np.float32) / 65535.0
    high = (v >> np.uint32(16)).astype(np.float32) / 65535.0
    return (low + high - 1.0)[:, :, None]


def luminance(rgb: np.ndarray, weights: np.ndarray = BT709) -> np.ndarray:
    return (rgb * weights).sum(axis=2, keepdims=True, dtype=np.float32)


def grey3(value: np.ndarray) -> np.ndarray:
    return np.repeat(np.clip(value, 0.0, 1.0), 3, axis=2)


def hex_palette(*colours: str) -> np.ndarray:
    return np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in colours], np.float32) / 255.0


def nearest_colour(rgb: np.ndarray, palette: np.ndarray) -> np.ndarray:
    distances = ((rgb[:, :, None, :] - palette[None, None]) ** 2).sum(axis=3)
    return palette[distances.argmin(axis=2)]


# --- effects (declared in registry.py) --------------------------------------------------------------


def blackwhite(x, origin, p, o):
    lum = luminance(x, TRI_X) ** (1.0 / p["gamma_correction"])
    lum = 0.5 + (lum - 0.5) * p["contrast_boost"]
    lum = lum + p["edge_strength"] * (lum - gaussian_blur(lum, 1.0))
    highlights = np.clip((lum - 0.75) / 0.25, 0.0, 1.0)
    lum = lum + p["halation_strength"] * gaussian_blur(highlights, p["halation_radius"] / 3.0)
    lum = np.clip(lum, 0.0, 1.0)
    midtones = 1.0 - np.abs(2.0 * lum - 1.0) * 0.5  # grain shows most in the midtones
    height, width = lum.shape[:2]
    noise = position_noise(origin, height, width, int(p["grain_seed"]))
    return grey3(lum + p["grain_strength"] * 0.5 * midtones * noise)


def sepia(x, origin, p, o):
    matrix = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], np.float32)
    toned = np.clip(x @ matrix.T, 0.0, 1.0)
    return x + p["strength"] * (toned - x)


def grayscale(x, origin, p, o):
    return grey3(luminance(x))


def invert(x, origin, p, o):
    return 1.0 - x


def posterize(x, origin, p, o):
    levels = p["levels"] - 1
    return np.rint(x * levels) / levels


def adjust(x, origin, p, o):
    out = x + p["brightness"]
    out = 0.5 + (out - 0.5) * p["contrast"]
    grey = luminance(out)
    out = grey + (out - grey) * p["saturation"]
    return np.clip(out, 0.0, 1.0) ** (1.0 / p["gamma"])


def blur(x, origin, p, o):
    return gaussian_blur(x, p["radius"])


def sharpen(x, origin, p, o):
    return x + p["amount"] * (x - gaussian_blur(x, p["radius"]))


def vignette(x, origin, p, o):
    height, width = x.shape[:2]
    ys = (np.arange(origin.y, origin.y + height, dtype=np.float32) + 0.5 - origin.height / 2)[:, None]
    xs = (np.arange(origin.x, origin.x + width, dtype=np.float32) + 0.5 - origin.width / 2)[None, :]
    half_diagonal = math.hypot(origin.width, origin.height) / 2
    distance = np.sqrt(xs * xs + ys * ys) / (half_diagonal * p["radius"])
    falloff = np.clip((distance - 0.5) / 0.5, 0.0, 1.0)
    return x * (1.0 - p["strength"] * falloff * falloff)[:, :, None]


def _block_grid(x: np.ndarray, origin: Origin, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means of the blocks of the image-wide block grid that `x` touches, and
    each pixel's block row and column (blocks at the array's edge use what the
    array holds; the halo keeps those out of the tile's core)."""
    height, width = x.shape[:2]
    rows = (np.arange(origin.y, origin.y + height) // block) - origin.y // block
    cols = (np.arange(origin.x, origin.x + width) // block) - origin.x // block
    row_starts = np.flatnonzero(np.diff(rows, prepend=-1))
    col_starts = np.flatnonzero(np.diff(cols, prepend=-1))
    sums = np.add.reduceat(np.add.reduceat(x.astype(np.float64), row_starts, axis=0), col_starts, axis=1)
    counts = np.diff(row_starts, append=height)[:, None, None] * np.diff(col_starts, append=width)[None, :, None]
    return (sums / counts).astype(np.float32), rows, cols


def _block_means(x: np.ndarray, origin: Origin, block: int) -> np.ndarray:
    """Each pixel takes the mean of its block."""
    means, rows, cols = _block_grid(x, origin, block)
    return means[rows[:, None], cols[None, :]]


def pixelate(x, origin, p, o):
    return _block_means(x, origin, int(p["block"]))


PIXEL_PALETTES = {
    "pico8": hex_palette(
        "#000000",
        "#1d2b53",
        "#7e2553",
        "#008751",
        "#ab5236",
        "#5f574f",
        "#c2c3c7",
        "#fff1e8",
        "#ff004d",
        "#ffa300",
        "#ffec27",
        "#00e436",
        "#29adff",
        "#83769c",
        "#ff77a8",
        "#ffccaa",
    ),
    "gameboy": hex_palette("#0f380f", "#306230", "#8bac0f", "#9bbc0f"),
    "c64": hex_palette(
        "#000000",
        "#ffffff",
        "#880000",
        "#aaffee",
        "#cc44cc",
        "#00cc55",
        "#0000aa",
        "#eeee77",
        "#dd8855",
        "#664400",
        "#ff7777",
        "#333333",
        "#777777",
        "#aaff66",
        "#0088ff",
        "#bbbbbb",
    ),
    "cga": hex_palette("#000000", "#55ffff", "#ff55ff", "#ffffff"),
}


def pixel8bit(x, origin, p, o):
    means, rows, cols = _block_grid(x, origin, int(p["block"]))
    return nearest_colour(means, PIXEL_PALETTES[o["palette"]])[rows[:, None], cols[None, :]]  # a colour per block


POP_PALETTES = (
    hex_palette("#1b1464", "#ed1e79", "#fbb03b", "#fcee21", "#ffffff", "#ffffff"),
    hex_palette("#0b3d2e", "#00a99d", "#f7931e", "#ffde17", "#fff8e7", "#fff8e7"),
    hex_palette("#2e1a47", "#662d91", "#29abe2", "#8cc63f", "#f2f2f2", "#f2f2f2"),
    hex_palette("#3b0d0d", "#c1272d", "#f15a24", "#f9ed32", "#fefefe", "#fefefe"),
)


def _pop_single(x: np.ndarray, levels: int, palette: np.ndarray) -> np.ndarray:
    band = np.clip((luminance(x) * levels).astype(np.int32), 0, levels - 1)[:, :, 0]
    return palette[band]


def popart(x, origin, p, o):
    levels = int(p["levels"])
    if o["grid"] == "off":
        return _pop_single(x, levels, POP_PALETTES[0])
    quadrants = [_pop_single(x, levels, palette) for palette in POP_PALETTES]
    return np.concatenate([np.concatenate(quadrants[:2], axis=1), np.concatenate(quadrants[2:], axis=1)], axis=0)


def dither(x, origin, p, o):
    spacing = int(p["dot_spacing"])
    levels = int(p["levels"])
    image = Image.fromarray(np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8), "RGB")
    small = image.reduce(spacing) if spacing > 1 else image
    palette_mode = o["palette"]
    if palette_mode == "rgb":
        steps = np.rint(np.linspace(0, 255, levels)).astype(np.uint8)
        colours = np.array([(r, g, b) for r in steps for g in steps for b in steps], np.uint8)
        source = small
    else:
        colours = np.repeat(
            np.rint(np.linspace(0, 255, 2 if palette_mode == "bw" else levels)).astype(np.uint8)[:, None], 3, axis=1
        )
        source = small.convert("L").convert("RGB")
    palette_image = Image.new("P", (1, 1))
    padded = np.zeros((256, 3), np.uint8)
    padded[: len(colours)] = colours
    padded[len(colours) :] = colours[-1]
    palette_image.putpalette(padded.flatten().tolist())
    dithered = source.quantize(palette=palette_image, dither=Image.Dither.FLOYDSTEINBERG).convert("RGB")
    if spacing > 1:
        dithered = dithered.resize((spacing * small.width, spacing * small.height), Image.Resampling.NEAREST).crop(
            (0, 0, image.width, image.height)
        )
        if dithered.size != image.size:  # reduce() rounds up; the last partial block repeats
            dithered = dithered.resize(image.size, Image.Resampling.NEAREST)
    return np.asarray(dithered, np.float32) / 255.0


@dataclass(frozen=True)
class ChainStep:
    effect: Effect
    params: dict
    options: dict


class Chain:
    """Consecutive effects applied in one pass over each tile."""

    def __init__(self, steps: list[ChainStep], width: int, height: int, mode: str, dtype: np.dtype):
        self.steps = steps
        self.width, self.height = width, height
        self.in_mode, self.in_dtype = mode, np.dtype(dtype)
        self.halo = sum(s.effect.halo(s.params, s.options) for s in steps)
        self.whole_image = any(s.effect.whole_image(s.params, s.options) for s in steps)
        self.scale = math.prod(s.effect.scale(s.params, s.options) for s in steps)
        grey = mode in ("L", "LA")
        for s in steps:
            grey = {"grey": True, "colour": False}.get(s.effect.output_kind(s.options), grey)
        self.has_alpha = mode in ("LA", "RGBA")
        self.out_mode = ("L" if grey else "RGB") + ("A" if self.has_alpha else "")
        self.out_dtype = np.dtype(np.uint8) if any(s.effect.eight_bit for s in steps) else self.in_dtype

    def apply(self, pixels: np.ndarray, origin: Origin) -> np.ndarray:
        """Effects on an array (a tile's context, or the whole image)."""
        maximum = float(np.iinfo(pixels.dtype).max)
        x = pixels.astype(np.float32) / maximum
        colour = x[:, :, :-1] if self.has_alpha else x
        rgb = np.repeat(colour, 3, axis=2) if colour.shape[2] == 1 else colour
        alpha = x[:, :, -1:] if self.has_alpha else None
        for s in self.steps:
            factor = s.effect.scale(s.params, s.options)
            rgb = s.effect.apply(rgb, origin, s.params, s.options)
            if alpha is not None and factor > 1:
                alpha = np.tile(alpha, (factor, factor, 1))
        out = rgb[:, :, :1] if self.out_mode in ("L", "LA") else rgb
        if alpha is not None:
            out = np.concatenate([out, alpha], axis=2)
        out_max = float(np.iinfo(self.out_dtype).max)
        return np.rint(np.clip(out, 0.0, 1.0) * out_max).astype(self.out_dtype)
