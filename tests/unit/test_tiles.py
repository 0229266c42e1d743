import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.errors import InvalidArgument
from services.common.tiles import MAX_TILE_BYTES, Rect, TileBuffer, grid, split_for_messages, wire_tile_size


def test_grid_covers_image_exactly_once():
    cells = grid(10, 7, 4, 3)
    coverage = np.zeros((7, 10), int)
    for r in cells:
        coverage[r.y0 : r.y1, r.x0 : r.x1] += 1
    assert (coverage == 1).all()
    assert cells[0] == Rect(0, 0, 4, 3) and cells[-1] == Rect(8, 6, 10, 7)


def test_split_for_messages_respects_the_byte_cap():
    rect = Rect(0, 0, 4096, 1024)
    parts = split_for_messages(rect, bytes_per_pixel=8)  # 16-bit RGBA
    assert all(p.width * p.height * 8 <= MAX_TILE_BYTES for p in parts)
    assert sum(p.width * p.height for p in parts) == rect.width * rect.height
    # A 16-bit RGBA 256x256 input tile upscaled 4x still goes out in messages under the cap.
    assert wire_tile_size(256, 8) ** 2 * 8 <= MAX_TILE_BYTES


def _buffer_from(image, tw, th):
    h, w, c = image.shape
    return TileBuffer(w, h, c, image.dtype, tw, th)


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 40),
    height=st.integers(1, 40),
    tw=st.integers(1, 16),
    th=st.integers(1, 16),
    seed=st.integers(0, 2**16),
    halo=st.integers(0, 6),
)
def test_buffer_reads_equal_the_source_in_any_arrival_order(width, height, tw, th, seed, halo):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 65535, (height, width, 3), dtype=np.uint16)
    buffer = _buffer_from(image, tw, th)
    cells = grid(width, height, tw, th)
    regions = [r.expand(halo, width, height) for r in grid(width, height, 7, 5)]
    done = set()
    for index in rng.permutation(len(cells)):
        cell = cells[index]
        buffer.add(cell, image[cell.y0 : cell.y1, cell.x0 : cell.x1])
        for i, region in enumerate(regions):
            if i not in done and buffer.covers(region):
                assert np.array_equal(buffer.read(region), image[region.y0 : region.y1, region.x0 : region.x1])
                done.add(i)
        buffer.release([r for i, r in enumerate(regions) if i not in done])
    assert buffer.complete and len(done) == len(regions)
    assert buffer.held_cells == 0


def test_buffer_in_raster_order_holds_only_a_band_of_cells():
    image = np.zeros((64, 64, 1), np.uint8)
    buffer = _buffer_from(image, 8, 8)
    regions = [r.expand(2, 64, 64) for r in grid(64, 64, 8, 8)]
    pending = list(regions)
    peak = 0
    for cell in grid(64, 64, 8, 8):
        buffer.add(cell, image[cell.y0 : cell.y1, cell.x0 : cell.x1])
        pending = [r for r in pending if not buffer.covers(r)]
        buffer.release(pending)
        peak = max(peak, buffer.held_cells)
    assert peak <= 2 * 8 + 2  # two rows of cells, not 64


@pytest.mark.parametrize(
    "rect, message",
    [
        (Rect(3, 0, 11, 8), "not on the declared"),
        (Rect(0, 0, 5, 8), "must be 8x8"),
        (Rect(64, 0, 72, 8), "outside"),
    ],
)
def test_buffer_refuses_tiles_off_the_grid(rect, message):
    buffer = TileBuffer(64, 64, 1, np.uint8, 8, 8)
    with pytest.raises(InvalidArgument, match=message):
        buffer.add(rect, np.zeros((rect.height, rect.width, 1), np.uint8))


def test_buffer_refuses_duplicates_and_missing_grid():
    buffer = TileBuffer(16, 16, 1, np.uint8, 8, 8)
    buffer.add(Rect(0, 0, 8, 8), np.zeros((8, 8, 1), np.uint8))
    with pytest.raises(InvalidArgument, match="twice"):
        buffer.add(Rect(0, 0, 8, 8), np.zeros((8, 8, 1), np.uint8))
    with pytest.raises(InvalidArgument, match="tile grid"):
        TileBuffer(16, 16, 1, np.uint8, 0, 0)


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(1, 50),
    height=st.integers(1, 50),
    cell=st.integers(1, 12),
    band=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_band_assembler_hands_out_complete_bands_in_order(width, height, cell, band, seed):
    from services.common.tiles import BandAssembler

    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (height, width, 2), dtype=np.uint8)
    assembler = BandAssembler(width, height, 2, np.uint8, band)
    out = []
    cells = grid(width, height, cell, cell)
    for index in rng.permutation(len(cells)):
        r = cells[index]
        out += assembler.add(r, image[r.y0 : r.y1, r.x0 : r.x1])
    assert np.array_equal(np.concatenate(out), image)
    assert all(b.shape[0] == band for b in out[:-1])


def test_intersection_is_the_part_both_cover():
    assert Rect(0, 0, 10, 8).intersection(Rect(6, 5, 20, 20)) == Rect(6, 5, 10, 8)
    assert Rect(2, 2, 4, 4).intersection(Rect(0, 0, 10, 10)) == Rect(2, 2, 4, 4)


def test_the_gateways_image_assembler_refuses_an_image_with_tiles_missing():
    from services.common import wire
    from services.common.failures import HttpError
    from services.common.mesh import ImageAssembler

    image = np.random.default_rng(3).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    header = wire.grid_header(53, 37, "RGB", image.dtype, max_cell=16)
    assembler = ImageAssembler(header)
    cells = grid(53, 37, header.tile_width, header.tile_height)
    for rect in reversed(cells[1:]):  # any order
        assembler.add_tile(wire.tile(rect, image[rect.y0 : rect.y1, rect.x0 : rect.x1]))
    assert not assembler.complete
    with pytest.raises(HttpError) as refused:
        assembler.pixels
    assert refused.value.status == 502
    assembler.add_tile(wire.tile(cells[0], image[cells[0].y0 : cells[0].y1, cells[0].x0 : cells[0].x1]))
    assert assembler.complete and np.array_equal(assembler.pixels, image)
