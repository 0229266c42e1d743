"""render_stream, the body every processing service runs on a stream: jobs rendered
alone or, for an op that renders several at once, together as they become ready."""

import asyncio

import numpy as np
import pytest
from imagemesh.v1 import pipeline_pb2

from services.common import wire
from services.common.errors import InvalidArgument, StreamEndedEarly
from services.common.streaming import StepPlan, render_stream
from services.common.tiles import GridAssembler, Rect, grid


class DoublingOp:
    """Nearest-neighbour 2x in 16-pixel jobs with a 2-pixel halo; records how many jobs each call rendered."""

    whole_image = False

    def __init__(self, width: int, height: int, together: int):
        self.width, self.height = width, height
        self.out_width, self.out_height, self.out_mode, self.out_dtype = 2 * width, 2 * height, "RGB", np.uint8
        self.jobs = list(grid(width, height, 16, 16))
        self.calls: list[int] = []
        if together > 1:
            self.tiles_together = together

    def context_rect(self, job: Rect) -> Rect:
        return job.expand(2, self.width, self.height)

    def output_rect(self, job: Rect) -> Rect:
        return Rect(2 * job.x0, 2 * job.y0, 2 * job.x1, 2 * job.y1)

    def prepare(self, whole: np.ndarray) -> None:
        pass

    def _double(self, job: Rect, context: np.ndarray) -> np.ndarray:
        core = context[job.relative_to(self.context_rect(job))]
        return core.repeat(2, axis=0).repeat(2, axis=1)

    def render(self, job: Rect, context: np.ndarray) -> np.ndarray:
        self.calls.append(0)  # one job, through render itself
        return self._double(job, context)

    def render_together(self, jobs: list[tuple[Rect, np.ndarray]]) -> list[np.ndarray]:
        self.calls.append(len(jobs))
        return [self._double(job, context) for job, context in jobs]


class Admission:
    async def compute(self, fn, *args):
        return await asyncio.to_thread(fn, *args)

    def finish(self) -> None:
        pass


def run(op: DoublingOp, image: np.ndarray, tiles: list | None = None, send=None) -> np.ndarray:
    height, width = image.shape[:2]
    header = wire.header(width, height, "RGB", np.uint8, tile_width=16, tile_height=16)
    info = wire.HeaderInfo(header, 1 << 20)
    if tiles is None:
        tiles = [wire.tile(rect, image[rect.y0 : rect.y1, rect.x0 : rect.x1]) for rect in grid(width, height, 16, 16)]
    out = GridAssembler(2 * width, 2 * height, 3, np.uint8, 2 * width, 2 * height)
    whole = []

    async def requests():
        for tile in tiles:
            yield pipeline_pb2.StreamRequest(tile=tile)

    async def emit(tile):
        rect, pixels = wire.tile_pixels(
            tile, wire.HeaderInfo(wire.header(2 * width, 2 * height, "RGB", np.uint8), 1 << 22)
        )
        whole.extend(pixels for _, pixels in out.add(rect, pixels))

    plan = StepPlan(op, pipeline_pb2.StepReport())
    asyncio.run(render_stream(plan, info, requests(), Admission(), send or emit))
    assert plan.report.tiles == len(op.jobs)
    return whole[0] if whole else np.empty(0)


IMAGE = np.random.default_rng(3).integers(0, 256, (48, 40, 3), dtype=np.uint8)  # 3 x 3 jobs
DOUBLED = IMAGE.repeat(2, axis=0).repeat(2, axis=1)


@pytest.mark.parametrize("together, calls", [(1, [0] * 9), (2, [2, 2, 2, 2, 1]), (4, [4, 4, 1])])
def test_an_op_that_renders_several_jobs_at_once_is_given_the_ready_ones_together(together, calls):
    op = DoublingOp(40, 48, together)
    assert np.array_equal(run(op, IMAGE), DOUBLED)
    assert op.calls == calls


def test_a_bad_tile_read_ahead_of_rendering_fails_the_stream():
    op = DoublingOp(40, 48, 2)
    tiles = [wire.tile(rect, IMAGE[rect.y0 : rect.y1, rect.x0 : rect.x1]) for rect in grid(40, 48, 16, 16)]
    tiles[-1].pixels = tiles[-1].pixels[:-1]
    with pytest.raises(InvalidArgument, match="383 bytes of pixels, expected 384"):
        run(op, IMAGE, tiles)


def test_a_stream_that_ends_with_jobs_unrendered_is_refused_as_ended_early():
    op = DoublingOp(40, 48, 2)
    tiles = [wire.tile(rect, IMAGE[rect.y0 : rect.y1, rect.x0 : rect.x1]) for rect in grid(40, 48, 16, 16)]
    with pytest.raises(StreamEndedEarly, match="input tiles missing"):
        run(op, IMAGE, tiles[:-2])
    assert 0 < sum(op.calls) < len(op.jobs)


def test_a_tile_that_cannot_be_sent_ends_the_stream_with_its_error_and_rendering_with_it():
    op = DoublingOp(40, 48, 2)
    op.preferred_cell = 32  # each job's output is a tile of its own, sent as soon as it is rendered

    async def refused(tile):
        raise InvalidArgument("the next service refused the tile")

    with pytest.raises(InvalidArgument, match="refused the tile"):
        run(op, IMAGE, send=refused)
    assert len(op.calls) == 1  # nothing more is rendered once a group's tiles cannot leave
