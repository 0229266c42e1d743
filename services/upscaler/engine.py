"""Upscaling as pure computation on numpy arrays: no gRPC, no environment.

An image is cut into inference tiles; each is rendered from its core plus a
halo of context pixels that is cropped away afterwards, so output tiles
partition the output exactly and can be sent as soon as they are done.

Scale: the model runs as many native passes as fit under the requested scale
(one pass at least), then Lanczos takes the result to the exact output size,
round(input * scale). With a 4x model: 2x = 4x pass then Lanczos down; 3x = 4x
pass then down; 8x = one 4x pass then 2x Lanczos (a second pass would cost 16x
the compute and re-sharpen the model's own texture). With a 2x model, 4x is
two passes and 8x three. The Lanczos step reads the tile's context pixels
beyond its box, so tiled output equals untiled output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

from services.common.contract import output_size
from services.common.resources import available_memory_bytes
from services.common.tiles import Rect, grid

from .backends import Backend, run_passes
from .lanes import InferenceLanes

UNSHARP_SIGMA, UNSHARP_AMOUNT, UNSHARP_MARGIN = 1.0, 0.5, 4
TILE_CHOICES = (1024, 768, 512, 384, 256, 192, 128, 96, 64)
CPU_MAX_TILE, GPU_MAX_TILE = 512, 1024


def tile_ladder(smallest: int) -> tuple[int, ...]:
    """The CPU tile edges above `smallest`, ascending: what calibration times for speed."""
    return tuple(edge for edge in sorted(TILE_CHOICES) if smallest < edge <= CPU_MAX_TILE)


@dataclass(frozen=True)
class Plan:
    in_width: int
    in_height: int
    out_width: int
    out_height: int
    scale: float
    passes: int
    stage_scale: int  # scale of the model's output (1 for plain Lanczos)
    tile: int
    halo: int
    tiles: tuple[Rect, ...]

    def _out_x(self, x: int) -> int:
        return (x * self.out_width + self.in_width // 2) // self.in_width

    def _out_y(self, y: int) -> int:
        return (y * self.out_height + self.in_height // 2) // self.in_height

    def output_rect(self, rect: Rect) -> Rect:
        """Where an input tile lands; tiles' output rects partition the output."""
        return Rect(self._out_x(rect.x0), self._out_y(rect.y0), self._out_x(rect.x1), self._out_y(rect.y1))

    def context_rect(self, rect: Rect) -> Rect:
        """The input region (core plus halo) a tile is rendered from."""
        return rect.expand(self.halo, self.in_width, self.in_height)

    @property
    def exact(self) -> bool:
        """The model's passes give the output size itself: no resampling follows them."""
        return (
            self.stage_scale * self.in_width == self.out_width and self.stage_scale * self.in_height == self.out_height
        )


def _resize_box(planes: np.ndarray, size: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """Lanczos-resize the `box` of (h, w, c) float planes to `size` (w, h);
    pixels outside the box but inside `planes` feed the filter's support."""
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(planes[:, :, c]), "F").resize(size, Image.Resampling.LANCZOS, box=box)
        )
        for c in range(planes.shape[2])
    ]
    return np.stack(channels, axis=2)


class UpscaleEngine:
    def __init__(
        self,
        model: Backend | None,
        native_scale: int,
        *,
        halo: int = 16,
        pad_multiple: int = 1,
        bytes_per_input_pixel: int = 1200,
        lanes: InferenceLanes | None = None,
        tile_speeds: dict[int, float] | None = None,
        default_tile: int = 0,
    ):
        self.model = model
        self.default_tile = default_tile  # a request's tile_size when it names none (0: auto_tile's choice)
        # Tile edge -> input pixels per second (halo included) that calibration measured at that size.
        self.tile_speeds = dict(tile_speeds or {})
        # Each network call runs in one of the service's inference lanes; the rest of a tile's work outside them.
        self.lanes = lanes or InferenceLanes(1)
        self.native_scale = native_scale if model else 1
        self.default_halo = halo
        self.pad_multiple = pad_multiple
        self.bytes_per_input_pixel = bytes_per_input_pixel

    def passes_for(self, scale: float) -> int:
        if self.model is None:
            return 0
        return max(1, int(math.floor(math.log(scale) / math.log(self.native_scale) + 1e-9)))

    def memory_tile(self, passes: int, concurrency: int = 1) -> int:
        """Largest tile whose working memory fits in a quarter of what is free, per concurrent request."""
        if self.model is not None and self.model.device == "cuda":  # big tiles keep a GPU busy; its memory limits
            free, _ = torch.cuda.mem_get_info(torch.device("cuda"))
            budget, cap = free / 2 / max(1, concurrency), GPU_MAX_TILE
        else:
            budget, cap = available_memory_bytes() / 4 / max(1, concurrency), CPU_MAX_TILE
        growth = (self.native_scale ** max(0, passes - 1)) ** 2  # later passes run on bigger tiles
        for edge in TILE_CHOICES:
            if edge * edge * self.bytes_per_input_pixel * growth <= budget:
                return min(edge, cap)
        return TILE_CHOICES[-1]

    def auto_tile(self, width: int, height: int, passes: int, halo: int, concurrency: int = 1) -> int:
        """Among the tiles calibration timed that fit in memory, the one this image takes
        least time in: its tiles' pixels, halos included, over the speed measured at that
        size (one tile that holds a small image has no halo at all). Without timings, the
        memory's choice."""
        memory = self.memory_tile(passes, concurrency)
        fitting = [edge for edge in self.tile_speeds if edge <= memory]
        if not fitting:
            return memory

        def seconds(edge: int) -> float:
            contexts = (rect.expand(halo, width, height) for rect in grid(width, height, edge, edge))
            return sum(c.width * c.height for c in contexts) / self.tile_speeds[edge]

        return min(sorted(fitting, reverse=True), key=seconds)  # a tie goes to the bigger tile: fewer calls

    def plan(
        self, width: int, height: int, scale: float, *, tile: int = 0, halo: int = 0, concurrency: int = 1
    ) -> Plan:
        passes = self.passes_for(scale)
        halo = halo or self.default_halo
        if self.model is None:  # Lanczos support plus the unsharp mask's margin, in input pixels
            halo = max(halo, 4 + math.ceil(UNSHARP_MARGIN / scale))
        tile = tile or self.default_tile or self.auto_tile(width, height, passes, halo, concurrency)
        out_width, out_height = output_size(width, height, scale)
        return Plan(
            width,
            height,
            out_width,
            out_height,
            scale,
            passes,
            self.native_scale**passes,
            tile,
            halo,
            tuple(grid(width, height, tile, tile)),
        )

    def _run_model(self, model: Backend, rgb: np.ndarray, passes: int) -> np.ndarray:
        def in_a_lane(batch: np.ndarray) -> np.ndarray:
            with self.lanes.call(model.adapts_threads) as threads:
                return model(batch, threads)

        x = np.ascontiguousarray(rgb.transpose(2, 0, 1)[None], np.float32)
        return run_passes(in_a_lane, x, passes, self.native_scale, self.pad_multiple)[0].transpose(1, 2, 0)

    def _to_output(self, plan: Plan, planes: np.ndarray, stage_scale: int, context: Rect, target: Rect) -> np.ndarray:
        """Take `planes` (the context region at `stage_scale`) to the `target` output rect."""
        if stage_scale * plan.in_width == plan.out_width and stage_scale * plan.in_height == plan.out_height:
            return planes[
                target.y0 - context.y0 * stage_scale : target.y1 - context.y0 * stage_scale,
                target.x0 - context.x0 * stage_scale : target.x1 - context.x0 * stage_scale,
            ]
        fx = stage_scale * plan.in_width / plan.out_width
        fy = stage_scale * plan.in_height / plan.out_height
        ox, oy = context.x0 * stage_scale, context.y0 * stage_scale
        box = (target.x0 * fx - ox, target.y0 * fy - oy, target.x1 * fx - ox, target.y1 * fy - oy)
        return _resize_box(planes, (target.width, target.height), box)

    def _lanczos_sharpened(self, plan: Plan, planes: np.ndarray, context: Rect, target: Rect) -> np.ndarray:
        # Sharpen a margin wider than the blur kernel, then crop it, so tiles agree with the whole image.
        wider = target.expand(UNSHARP_MARGIN, plan.out_width, plan.out_height)
        resized = self._to_output(plan, planes, 1, context, wider)
        blurred = cv2.GaussianBlur(resized, (0, 0), UNSHARP_SIGMA, borderType=cv2.BORDER_REFLECT)
        if blurred.ndim == 2:
            blurred = blurred[:, :, None]
        sharpened = resized + UNSHARP_AMOUNT * (resized - blurred)
        return sharpened[target.relative_to(wider)]

    def _scale_planes(self, plan: Plan, planes: np.ndarray, context: Rect, target: Rect) -> np.ndarray:
        """float planes of the context rect to the target rect: through the network, or Lanczos without one."""
        if self.model is None:
            return self._lanczos_sharpened(plan, planes, context, target)
        grey = planes.shape[2] == 1
        rgb = np.repeat(planes, 3, axis=2) if grey else planes
        out = self._to_output(plan, self._run_model(self.model, rgb, plan.passes), plan.stage_scale, context, target)
        return out.mean(axis=2, keepdims=True) if grey else out

    def render(
        self, plan: Plan, rect: Rect, context_pixels: np.ndarray, mode: str, alpha_through_model: bool = False
    ) -> np.ndarray:
        """Output pixels of one tile from the pixels of its context rect: the colour
        planes through the backend's exact path when no resampling follows the
        network, else as float planes; alpha alongside, through the network or
        resampled."""
        context = plan.context_rect(rect)
        target = plan.output_rect(rect)
        has_alpha = mode in ("LA", "RGBA")
        colour = context_pixels[:, :, :-1] if has_alpha else context_pixels
        maximum = float(np.iinfo(context_pixels.dtype).max)

        def quantised(planes: np.ndarray) -> np.ndarray:
            return np.rint(np.clip(planes, 0.0, 1.0) * maximum).astype(context_pixels.dtype)

        if self.model is not None and plan.exact and colour.shape[2] == 3:
            stage = plan.stage_scale
            rows = slice(target.y0 - context.y0 * stage, target.y1 - context.y0 * stage)
            cols = slice(target.x0 - context.x0 * stage, target.x1 - context.x0 * stage)
            with self.lanes.call(self.model.adapts_threads) as threads:
                out = self.model.render_exact(
                    np.ascontiguousarray(colour), plan.passes, self.native_scale, self.pad_multiple, rows, cols, threads
                )
        else:
            out = quantised(self._scale_planes(plan, colour.astype(np.float32) / maximum, context, target))
        if not has_alpha:
            return out
        alpha = context_pixels[:, :, -1:].astype(np.float32) / maximum
        if alpha_through_model and self.model is not None:
            alpha_out = self._scale_planes(plan, alpha, context, target)
        else:
            alpha_out = self._to_output(plan, alpha, 1, context, target)
        return np.concatenate([out, quantised(alpha_out)], axis=2)

    @property
    def tiles_together(self) -> int:
        """How many tiles a request renders at once: one per lane when the backend can
        narrow its calls, else one (each call would take every thread anyway)."""
        return self.lanes.lanes if self.model is not None and self.model.adapts_threads else 1

    def upscale(
        self,
        pixels: np.ndarray,
        mode: str,
        scale: float,
        *,
        tile: int = 0,
        halo: int = 0,
        alpha_through_model: bool = False,
    ) -> np.ndarray:
        """Whole image in memory, tile by tile (for tests, benchmarks and tools): one request."""
        with self.lanes.request():
            return self._upscale(pixels, mode, scale, tile=tile, halo=halo, alpha_through_model=alpha_through_model)

    def _upscale(
        self, pixels: np.ndarray, mode: str, scale: float, *, tile: int, halo: int, alpha_through_model: bool
    ) -> np.ndarray:
        height, width = pixels.shape[:2]
        plan = self.plan(width, height, scale, tile=tile, halo=halo, concurrency=self.tiles_together)
        whole_in, whole_out = Rect(0, 0, width, height), Rect(0, 0, plan.out_width, plan.out_height)
        out = np.empty((plan.out_height, plan.out_width, pixels.shape[2]), pixels.dtype)

        def render_into(rect: Rect) -> None:
            context = pixels[plan.context_rect(rect).relative_to(whole_in)]
            rendered = self.render(plan, rect, context, mode, alpha_through_model)
            out[plan.output_rect(rect).relative_to(whole_out)] = rendered

        self.lanes.each(render_into, plan.tiles, self.tiles_together)
        return out
