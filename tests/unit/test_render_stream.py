"""render_stream, the body every processing service runs on a stream: jobs rendered
one at a time or, for an op that renders several at once, up to that many, each taken
as soon as a renderer is free."""

import asyncio
import threading

import numpy as np
import pytest
from imagemesh.v1 import pipeline_pb2

from services.common import wire
from services.common.errors import InvalidArgument, StreamEndedEarly
from services.common.streaming import StepPlan, render_stream
from services.common.tiles import GridAssembler, Rect, grid


class DoublingOp:
    """Nearest-neighbour 2x in 16-pixel jobs with a 2-pixel halo; records its renders, how many
    ran at once, and what it was told of the jobs ready."""

    whole_image = False

    def __init__(self, width: int, height: int, together: int):
        self.width, self.height = width, height
        self.out_width, self.out_height, self.out_mode, self.out_dtype = 2 * width, 2 * height, "RGB", np.uint8
        self.jobs = list(grid(width, height, 16, 16))
        self.rendered: list[Rect] = []
        self.in_flight = self.most_in_flight = 0
        self.told: list[int] = []
        self.counting = threading.Lock()
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
        with self.counting:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return self._double(job, context)
        finally:
            with self.counting:
                self.in_flight -= 1
                self.rendered.append(job)

    def ready(self, jobs: int) -> None:
        self.told.append(jobs)


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


@pytest.mark.parametrize("together", [1, 2, 4])
def test_an_op_renders_up_to_its_jobs_together_at_once_and_is_told_how_many_are_ready(together):
    op = DoublingOp(40, 48, together)
    assert np.array_equal(run(op, IMAGE), DOUBLED)
    assert len(op.rendered) == len(op.jobs) and set(op.rendered) == set(op.jobs)  # each job once
    assert op.most_in_flight <= together
    if together > 1:
        assert max(op.told) > 1 and op.told[-1] == 0  # several ready at once; none once rendering ended
    else:
        assert op.told == []  # an op that renders one job at a time is not asked


class WaitsForTheOthers(DoublingOp):
    """The first job's render ends only once every other job has rendered."""

    def __init__(self, width: int, height: int, together: int):
        super().__init__(width, height, together)
        self.others_done = threading.Event()

    def render(self, job: Rect, context: np.ndarray) -> np.ndarray:
        if job == self.jobs[0]:
            self.others_done.wait(timeout=30)  # a bound, so that a failure fails rather than hangs
        out = super().render(job, context)
        if len(self.rendered) == len(self.jobs) - 1 and job != self.jobs[0]:
            self.others_done.set()
        return out


def test_a_slow_job_holds_up_no_other_job():
    op = WaitsForTheOthers(40, 48, 2)
    assert np.array_equal(run(op, IMAGE), DOUBLED)
    assert op.rendered[-1] == op.jobs[0]  # the other renderer took every other job meanwhile


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
    assert 0 < len(op.rendered) < len(op.jobs)


def test_a_tile_that_cannot_be_sent_ends_the_stream_with_its_error_and_rendering_with_it():
    op = DoublingOp(40, 48, 2)
    op.preferred_cell = 32  # each job's output is a tile of its own, sent as soon as it is rendered

    async def refused(tile):
        raise InvalidArgument("the next service refused the tile")

    with pytest.raises(InvalidArgument, match="refused the tile"):
        run(op, IMAGE, send=refused)
    # Nothing starts once the first output cannot leave: at most the outputs waiting to leave
    # behind it (one per renderer) and those rendering (as many) came after it.
    assert len(op.rendered) <= 1 + 2 * 2 < len(op.jobs)
