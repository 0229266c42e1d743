"""Background removal as pure computation on numpy arrays.

The mask is predicted once for the whole image at the model's resolution and
resized to full resolution; cutting out is then done region by region, so
output tiles stream. The keyer needs no model: it takes the background colour
from the image border, the connected region of similar colour, and gives it a
soft, colour-decontaminated edge."""

from __future__ import annotations

import re
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import ImageColor

from services.common.errors import InvalidArgument, quoted
from services.common.imageio import to_8bit

from .models import Segmenter

DEFAULT_TOLERANCE = 32


@dataclass
class Cutout:
    mask: np.ndarray  # float32 (h, w) in [0, 1]
    foreground: np.ndarray | None = None  # float32 (h, w, 3) colours with the background unmixed, or None

    @property
    def nbytes(self) -> int:
        return self.mask.nbytes + (self.foreground.nbytes if self.foreground is not None else 0)


def parse_colour(text: str) -> tuple[int, int, int]:
    """'#rrggbb', '#rgb', 'r,g,b' or a CSS colour name."""
    text = text.strip()
    match = re.fullmatch(r"(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})", text)
    if match and all(int(v) <= 255 for v in match.groups()):
        red, green, blue = (int(v) for v in match.groups())
        return red, green, blue
    try:
        named = ImageColor.getrgb(text)
        return named[0], named[1], named[2]
    except ValueError:
        raise InvalidArgument(
            f"bgcolor {quoted(text)} is not a colour ('#rrggbb', 'r,g,b' or a name)", field="bgcolor"
        ) from None


def colour_rgb(pixels: np.ndarray, mode: str) -> np.ndarray:
    """The colour channels as 8-bit RGB, for models and the keyer."""
    colour = pixels[:, :, :-1] if mode in ("LA", "RGBA") else pixels
    colour = to_8bit(colour)
    return np.repeat(colour, 3, axis=2) if colour.shape[2] == 1 else colour


def keyer(rgb8: np.ndarray, tolerance: float = DEFAULT_TOLERANCE, connected: bool = True) -> Cutout:
    rgb = rgb8.astype(np.float32)
    border = np.concatenate(
        [rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3), rgb[:, :2].reshape(-1, 3), rgb[:, -2:].reshape(-1, 3)]
    )
    background = np.median(border, axis=0)
    distance = np.sqrt(((rgb - background) ** 2).sum(axis=2))
    similar = (distance < tolerance).astype(np.uint8)
    if connected:  # only the region of background colour that touches the border
        count, labels = cv2.connectedComponents(similar, connectivity=8)
        edge_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        is_background = np.isin(labels, edge_labels[edge_labels > 0])
    else:
        is_background = similar.astype(bool)
    alpha = (~is_background).astype(np.float32)
    # Soft edge: within two pixels of the boundary, alpha follows the colour distance.
    kernel = np.ones((5, 5), np.uint8)
    band = np.logical_and(
        cv2.dilate(is_background.astype(np.uint8), kernel), cv2.dilate((~is_background).astype(np.uint8), kernel)
    )
    soft = np.clip((distance - tolerance * 0.5) / tolerance, 0.0, 1.0)
    alpha = np.where(band.astype(bool), soft, alpha)
    # Unmix the background colour from edge pixels so they do not fringe on a new background.
    weight = np.maximum(alpha, 1e-3)[:, :, None]
    foreground = np.clip((rgb - (1.0 - alpha[:, :, None]) * background) / weight, 0, 255) / 255.0
    foreground = np.where((alpha > 0)[:, :, None], foreground, rgb / 255.0).astype(np.float32)
    return Cutout(alpha, foreground)


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """Binary clean-up: drop specks, fill small holes, then a smooth 1-pixel edge."""
    binary: np.ndarray = (mask > 0.5).astype(np.uint8)
    binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count > 1:
        areas = stats[1:, cv2.CC_STAT_AREA]
        keep = np.concatenate([[False], areas >= 0.01 * areas.max()])
        binary = keep[labels].astype(np.uint8)
    holes = 1 - binary
    count, labels, stats, _ = cv2.connectedComponentsWithStats(holes, connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    small = stats[:, cv2.CC_STAT_AREA] < 0.005 * mask.size
    fill = small & ~np.isin(np.arange(count), border)
    fill[0] = False
    binary = np.where(fill[labels], 1, binary).astype(np.float32)
    return np.clip(cv2.GaussianBlur(binary, (0, 0), 1.0), 0.0, 1.0)


def guided_refine(mask: np.ndarray, rgb8: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """Guided filter with the image as guide: edges snap to the image's edges
    and hair-like detail keeps a soft alpha. O(pixels) with box filters."""
    radius = max(2, round(min(mask.shape) / 150))
    guide = cv2.cvtColor(rgb8, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    size = (2 * radius + 1, 2 * radius + 1)

    def box(a):
        return cv2.boxFilter(a, -1, size, borderType=cv2.BORDER_REFLECT)

    mean_i, mean_p = box(guide), box(mask)
    a = (box(guide * mask) - mean_i * mean_p) / (box(guide * guide) - mean_i * mean_i + eps)
    b = mean_p - a * mean_i
    return np.clip(box(a) * guide + box(b), 0.0, 1.0)


def load_matting() -> None:
    """Import pymatting, whose numba functions compile on import when numba's cache is
    cold (a minute on 2 cores): done while the service loads, so no request waits for it."""
    import pymatting  # noqa: F401


def alpha_matting(mask: np.ndarray, rgb8: np.ndarray, erode_size: int = 10) -> Cutout:
    """Closed-form matting on a trimap from the mask (slow; opt-in)."""
    from pymatting import estimate_alpha_cf, estimate_foreground_ml  # imported by load_matting

    kernel = np.ones((erode_size, erode_size), np.uint8)
    sure_fg = cv2.erode((mask > 240 / 255).astype(np.uint8), kernel)
    sure_bg = cv2.erode((mask < 10 / 255).astype(np.uint8), kernel)
    trimap = np.full(mask.shape, 0.5)
    trimap[sure_fg.astype(bool)] = 1.0
    trimap[sure_bg.astype(bool)] = 0.0
    image = rgb8.astype(np.float64) / 255.0
    if not (trimap == 0.5).any() or not (trimap == 1.0).any() or not (trimap == 0.0).any():
        return Cutout(mask)  # nothing uncertain, or no sure foreground/background: matting adds nothing
    alpha = np.clip(estimate_alpha_cf(image, trimap), 0.0, 1.0)
    foreground = estimate_foreground_ml(image, alpha)
    return Cutout(alpha.astype(np.float32), np.clip(foreground, 0, 1).astype(np.float32))


@dataclass(frozen=True)
class RemovalOptions:
    only_mask: bool = False
    bgcolor: tuple[int, int, int] | None = None
    post_process: bool = False
    refine: bool = False
    alpha_matting: bool = False
    tolerance: int = DEFAULT_TOLERANCE
    all_similar: bool = False

    def cache_key(self) -> str:
        """What changes the mask (output options do not)."""
        return (
            f"pp={self.post_process},r={self.refine},am={self.alpha_matting},t={self.tolerance},all={self.all_similar}"
        )


def compute_cutout(segmenter: Segmenter, pixels: np.ndarray, mode: str, options: RemovalOptions) -> Cutout:
    rgb8 = colour_rgb(pixels, mode)
    if segmenter.spec is None:
        cutout = keyer(rgb8, options.tolerance, connected=not options.all_similar)
    else:
        cutout = Cutout(segmenter.predict(rgb8))
    if options.post_process:
        cutout = Cutout(clean_mask(cutout.mask), cutout.foreground)
    if options.refine:
        cutout = Cutout(guided_refine(cutout.mask, rgb8), cutout.foreground)
    if options.alpha_matting:
        matted = alpha_matting(cutout.mask, rgb8)
        cutout = Cutout(matted.mask, matted.foreground if matted.foreground is not None else cutout.foreground)
    return cutout


def output_mode(mode: str, options: RemovalOptions) -> str:
    grey = mode in ("L", "LA")
    if options.only_mask:
        return "L"
    if options.bgcolor is not None:
        return "L" if grey else "RGB"
    return "LA" if grey else "RGBA"


def cut_out(
    region: np.ndarray, mode: str, cutout_mask: np.ndarray, foreground: np.ndarray | None, options: RemovalOptions
) -> np.ndarray:
    """Output pixels of one region, given the cut-out's mask (and unmixed colours) there."""
    maximum = float(np.iinfo(region.dtype).max)
    has_alpha = mode in ("LA", "RGBA")
    if not has_alpha and foreground is None and options.bgcolor is None and not options.only_mask:
        # The common case: the pixels as they are, the mask as their alpha (no float copy of the image).
        if region.dtype == np.uint8:
            return cv2.merge([*cv2.split(region), cv2.convertScaleAbs(cutout_mask, alpha=maximum)])  # rounds
        alpha = (cutout_mask * maximum + 0.5).astype(region.dtype)  # the cast truncates: +0.5 rounds
        return np.concatenate([region, alpha[:, :, None]], axis=2)
    alpha = cutout_mask[:, :, None]
    if has_alpha:
        alpha = alpha * (region[:, :, -1:].astype(np.float32) / maximum)
    if options.only_mask:
        out = alpha
    else:
        colour = region[:, :, :-1] if has_alpha else region
        colour = colour.astype(np.float32) / maximum
        if foreground is not None:
            colour = foreground if colour.shape[2] == 3 else foreground.mean(axis=2, keepdims=True)
        if options.bgcolor is not None:
            background = np.array(options.bgcolor, np.float32) / 255.0
            if colour.shape[2] == 1:
                background = np.array(
                    [0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]], np.float32
                )
            out = colour * alpha + background * (1.0 - alpha)
        else:
            out = np.concatenate([colour, alpha], axis=2)
    return np.rint(np.clip(out, 0.0, 1.0) * maximum).astype(region.dtype)
