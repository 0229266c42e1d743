"""Tile geometry and the receive-side buffer that turns a stream of tiles into
the regions an operation needs, holding only the tiles still needed.

Pure numpy: no gRPC here (see wire.py for the protobuf side)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .errors import InvalidArgument

# Payload cap for one tile message: well under gRPC's 4 MiB default receive
# limit, leaving room for the envelope.
MAX_TILE_BYTES = 1 << 20


@dataclass(frozen=True)
class Rect:
    """Half-open pixel rectangle [x0, x1) x [y0, y1)."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def expand(self, margin: int, width: int, height: int) -> "Rect":
        """Grow by `margin` on every side, clipped to a width x height image."""
        return Rect(
            max(0, self.x0 - margin),
            max(0, self.y0 - margin),
            min(width, self.x1 + margin),
            min(height, self.y1 + margin),
        )

    def intersects(self, other: "Rect") -> bool:
        return self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1

    def intersection(self, other: "Rect") -> "Rect":
        """The part both cover (for rects that intersect)."""
        return Rect(max(self.x0, other.x0), max(self.y0, other.y0), min(self.x1, other.x1), min(self.y1, other.y1))

    def relative_to(self, outer: "Rect") -> tuple[slice, slice]:
        """Numpy (rows, cols) slices of this rect inside an array covering `outer`."""
        return (slice(self.y0 - outer.y0, self.y1 - outer.y0), slice(self.x0 - outer.x0, self.x1 - outer.x0))


def grid_cell(column: int, row: int, cell_width: int, cell_height: int, width: int, height: int) -> Rect:
    """One cell of a grid over a width x height image; the last column and row are cut short."""
    x, y = column * cell_width, row * cell_height
    return Rect(x, y, min(x + cell_width, width), min(y + cell_height, height))


def cells_touched(rect: Rect, cell_width: int, cell_height: int) -> Iterator[tuple[int, int]]:
    """The (column, row) of every cell of a grid that `rect` touches, in raster order."""
    for row in range(rect.y0 // cell_height, (rect.y1 - 1) // cell_height + 1):
        for column in range(rect.x0 // cell_width, (rect.x1 - 1) // cell_width + 1):
            yield column, row


def grid(width: int, height: int, tile_width: int, tile_height: int) -> list[Rect]:
    """Cells of a tile grid over an image, in raster order."""
    return [
        grid_cell(column, row, tile_width, tile_height, width, height)
        for row in range(-(-height // tile_height))
        for column in range(-(-width // tile_width))
    ]


def split_for_messages(rect: Rect, bytes_per_pixel: int, max_bytes: int = MAX_TILE_BYTES) -> list[Rect]:
    """Cut a rect into row bands (and column blocks for very wide rows) whose
    pixels each fit in one message."""
    max_pixels = max(1, max_bytes // bytes_per_pixel)
    block_width = min(rect.width, max_pixels)
    rows = max(1, max_pixels // block_width)
    return [
        Rect(x, y, min(x + block_width, rect.x1), min(y + rows, rect.y1))
        for y in range(rect.y0, rect.y1, rows)
        for x in range(rect.x0, rect.x1, block_width)
    ]


def wire_tile_size(width: int, bytes_per_pixel: int, preferred: int = 256) -> int:
    """Edge of square wire tiles that keep one tile under MAX_TILE_BYTES."""
    edge = preferred
    while edge > 16 and edge * edge * bytes_per_pixel > MAX_TILE_BYTES:
        edge //= 2
    return edge


class TileBuffer:
    """Collects the tiles of one image, sent on a known grid in any order, and
    hands out regions once every grid cell they touch has arrived.

    Each cell is kept until every region that needs it has been read
    (`release`), so memory follows the tiles in flight, not the image: with
    tiles sent in raster order it holds about two rows of cells."""

    def __init__(self, width: int, height: int, channels: int, dtype: np.dtype, tile_width: int, tile_height: int):
        if tile_width <= 0 or tile_height <= 0:
            raise InvalidArgument(
                "the image header must declare its tile grid (tile_width, tile_height)", field="image.tile_width"
            )
        self.width, self.height, self.channels = width, height, channels
        self.dtype = np.dtype(dtype)
        self.tile_width, self.tile_height = tile_width, tile_height
        self.columns = -(-width // tile_width)
        self.rows = -(-height // tile_height)
        self._cells: dict[tuple[int, int], np.ndarray] = {}
        self._received: set[tuple[int, int]] = set()

    @property
    def complete(self) -> bool:
        return len(self._received) == self.columns * self.rows

    @property
    def missing(self) -> int:
        return self.columns * self.rows - len(self._received)

    @property
    def held_cells(self) -> int:
        return len(self._cells)

    def cell_rect(self, column: int, row: int) -> Rect:
        return grid_cell(column, row, self.tile_width, self.tile_height, self.width, self.height)

    def add(self, rect: Rect, pixels: np.ndarray) -> None:
        """Store one cell; `pixels` is its (height, width, channels) array."""
        if rect.x0 % self.tile_width or rect.y0 % self.tile_height:
            raise InvalidArgument(
                f"tile at ({rect.x0}, {rect.y0}) is not on the declared {self.tile_width}x{self.tile_height} grid",
                field="tile",
            )
        key = (rect.x0 // self.tile_width, rect.y0 // self.tile_height)
        if key[0] >= self.columns or key[1] >= self.rows:
            raise InvalidArgument(
                f"tile at ({rect.x0}, {rect.y0}) lies outside the {self.width}x{self.height} image", field="tile"
            )
        if rect != self.cell_rect(*key):
            expected = self.cell_rect(*key)
            raise InvalidArgument(
                f"tile at ({rect.x0}, {rect.y0}) must be {expected.width}x{expected.height}, "
                f"got {rect.width}x{rect.height}",
                field="tile",
            )
        if key in self._received:
            raise InvalidArgument(f"tile at ({rect.x0}, {rect.y0}) was sent twice", field="tile")
        self._received.add(key)
        self._cells[key] = pixels

    def cell_keys(self, rect: Rect) -> Iterator[tuple[int, int]]:
        """The (column, row) of every grid cell that `rect` touches."""
        return cells_touched(rect, self.tile_width, self.tile_height)

    def covers(self, rect: Rect) -> bool:
        return all(key in self._received for key in self.cell_keys(rect))

    def read(self, rect: Rect) -> np.ndarray:
        """Pixels of a covered region (cells must not have been released)."""
        out = np.empty((rect.height, rect.width, self.channels), self.dtype)
        for key in self.cell_keys(rect):
            cell = self.cell_rect(*key)
            part = cell.intersection(rect)
            out[part.relative_to(rect)] = self._cells[key][part.relative_to(cell)]
        return out

    def drop(self, key: tuple[int, int]) -> None:
        """Forget a received cell that no region still needs."""
        self._cells.pop(key, None)

    def release(self, still_needed: list[Rect]) -> None:
        """Drop every received cell that none of the `still_needed` regions touches."""
        keep = {key for rect in still_needed for key in self.cell_keys(rect)}
        for key in [key for key in self._cells if key not in keep]:
            del self._cells[key]


class GridAssembler:
    """Re-cuts output regions that arrive in any shape into the cells of a
    regular grid, handing out each cell as soon as it is complete. Holds only
    partly filled cells (for raster-ordered output: about one band)."""

    def __init__(self, width: int, height: int, channels: int, dtype: np.dtype, cell_width: int, cell_height: int):
        self.width, self.height, self.channels, self.dtype = width, height, channels, np.dtype(dtype)
        self.cell_width, self.cell_height = cell_width, cell_height
        self._partial: dict[tuple[int, int], tuple[np.ndarray, int]] = {}

    @property
    def held_cells(self) -> int:
        return len(self._partial)

    def cell_rect(self, column: int, row: int) -> Rect:
        return grid_cell(column, row, self.cell_width, self.cell_height, self.width, self.height)

    def add(self, rect: Rect, pixels: np.ndarray) -> list[tuple[Rect, np.ndarray]]:
        done = []
        for column, row in cells_touched(rect, self.cell_width, self.cell_height):
            cell = self.cell_rect(column, row)
            part = cell.intersection(rect)
            if part == cell:  # the common case: no copy needed
                done.append((cell, pixels[cell.relative_to(rect)]))
                continue
            array, filled = self._partial.get((column, row)) or (
                np.empty((cell.height, cell.width, self.channels), self.dtype),
                0,
            )
            array[part.relative_to(cell)] = pixels[part.relative_to(rect)]
            filled += part.width * part.height
            if filled == cell.width * cell.height:
                self._partial.pop((column, row), None)
                done.append((cell, array))
            else:
                self._partial[(column, row)] = (array, filled)
        return done


class BandAssembler:
    """Collects tiles into full-width bands of rows and hands out each band,
    top to bottom, once it is complete: for writers that go row by row."""

    def __init__(self, width: int, height: int, channels: int, dtype: np.dtype, band_height: int):
        self.width, self.height, self.channels, self.dtype = width, height, channels, np.dtype(dtype)
        self.band_height = band_height
        self._bands: dict[int, tuple[np.ndarray, int]] = {}
        self._next = 0

    def _rect(self, index: int) -> Rect:
        y = index * self.band_height
        return Rect(0, y, self.width, min(y + self.band_height, self.height))

    def add(self, rect: Rect, pixels: np.ndarray) -> list[np.ndarray]:
        for index in range(rect.y0 // self.band_height, (rect.y1 - 1) // self.band_height + 1):
            band = self._rect(index)
            part = band.intersection(rect)
            array, filled = self._bands.get(index) or (
                np.empty((band.height, band.width, self.channels), self.dtype),
                0,
            )
            array[part.relative_to(band)] = pixels[part.relative_to(rect)]
            self._bands[index] = (array, filled + part.width * part.height)
        done = []
        while (
            self._next in self._bands
            and self._bands[self._next][1] == self._rect(self._next).width * self._rect(self._next).height
        ):
            done.append(self._bands.pop(self._next)[0])
            self._next += 1
        return done
