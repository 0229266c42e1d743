"""The stream every processing service speaks (pipeline.proto): tiles in on
the sender's grid, an operation rendered region by region, tiles out on the
output grid, and, when the request has further steps, those tiles forwarded
to the next step's service while its answer is relayed back to the caller.

Memory stays bounded by tiles in flight: the input buffer keeps only what
pending regions need, the output assembler only partly filled cells, and
every queue between tasks is bounded."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Protocol,
    Sequence,
    runtime_checkable,
)

import grpc
import numpy as np
from imagemesh.v1 import common_pb2, pipeline_pb2

from . import logs, wire
from .config import ServiceConfig
from .contract import MAX_STEPS
from .errors import InvalidArgument, LimitExceeded, ServiceError, StreamEndedEarly, StreamTimeout, error_detail
from .server import CHANNEL_OPTIONS, HOP_HEADER, Admission, ServiceRuntime, channel_target
from .tiles import GridAssembler, Rect, TileBuffer
from .topology import BY_STEP

logger = logging.getLogger("imagemesh.streaming")

QUEUE_MESSAGES = 8
_END = object()
HEARTBEAT_SECONDS = 10.0
HEARTBEAT = pipeline_pb2.StreamRequest(heartbeat=pipeline_pb2.Heartbeat())
# ACCEPT_BEFORE_TILES: a sender waits for the StreamResult header before it
# sends tiles. The service checks the start message (and hears from the next
# steps' services) before that header, so a refusal arrives while nothing is
# being written; grpc-python's aio client reports INTERNAL instead of the
# server's status when the stream ends under a pending write (grpc/grpc#36066).


class Sender:
    """Writes the request side of a streaming call from a task of our own: the start
    message at once, then the rest once `accepted` is set (see ACCEPT_BEFORE_TILES).
    grpc-python ends the task that consumes a request iterator only while the call is
    still running, so a call refused at its start left that task pending for ever (and
    its generator closed later, logged under another request's id); close() ends ours."""

    def __init__(self, call: grpc.aio.StreamStreamCall, start, rest: AsyncIterable | Iterable):
        self.accepted = asyncio.Event()
        self._task = asyncio.create_task(self._write(call, start, rest))

    async def _write(self, call: grpc.aio.StreamStreamCall, start, rest: AsyncIterable | Iterable) -> None:
        try:
            await call.write(start)
            await self.accepted.wait()
            if isinstance(rest, AsyncIterable):
                await self._write_with_heartbeats(call, aiter(rest))
            else:
                for message in rest:
                    await call.write(message)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the call has ended: its reader reports how
        except Exception:
            # Requests that cannot be written must not leave the call waiting for them.
            logger.exception("writing a stream's requests failed")
            call.cancel()

    @staticmethod
    async def _write_with_heartbeats(call: grpc.aio.StreamStreamCall, rest: AsyncIterator) -> None:
        """The messages as they come, and a heartbeat whenever none has come for a while
        (the next tile is still being computed)."""
        upcoming: asyncio.Future | None = None
        try:
            while True:
                upcoming = upcoming or asyncio.ensure_future(anext(rest, _END))
                done, _ = await asyncio.wait({upcoming}, timeout=HEARTBEAT_SECONDS)
                if not done:
                    await call.write(HEARTBEAT)
                    continue
                message, upcoming = upcoming.result(), None
                if message is _END:
                    return
                await call.write(message)
        finally:
            if upcoming is not None:
                upcoming.cancel()

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def until_end(queue: asyncio.Queue) -> AsyncIterator:
    """The items put on a queue, up to the _END marker."""
    while (item := await queue.get()) is not _END:
        yield item


class TileOp(Protocol):
    """One service's operation on a streamed image (read-only attributes: plain ones satisfy them)."""

    @property
    def out_width(self) -> int: ...

    @property
    def out_height(self) -> int: ...

    @property
    def out_mode(self) -> str: ...

    @property
    def out_dtype(self) -> np.dtype: ...

    @property
    def jobs(self) -> Sequence[Rect]: ...  # input regions to render, in order

    @property
    def whole_image(self) -> bool: ...  # True: prepare() sees the whole input before any render()

    # Optional attribute preferred_cell: the output grid's edge in pixels, at most.

    def context_rect(self, job: Rect) -> Rect: ...

    def output_rect(self, job: Rect) -> Rect: ...

    def prepare(self, whole: np.ndarray) -> None: ...

    def render(self, job: Rect, context: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class RendersTogether(Protocol):
    """A TileOp that renders up to `tiles_together` of a stream's jobs at once, each in a
    call of its own; `ready` is told how many are ready or rendering (0 once rendering ends)."""

    tiles_together: int

    def ready(self, jobs: int) -> None: ...


@dataclass
class StepPlan:
    op: TileOp
    report: pipeline_pb2.StepReport
    steps_used: int = 1  # how many leading steps this service applies
    observe: Callable[[float], None] = field(default=lambda seconds: None)


class RelayedError(ServiceError):
    """A downstream service's error, passed on with its own status and reason."""

    def __init__(self, exc: grpc.aio.AioRpcError, method: str):
        detail = error_detail(exc)
        self.code = exc.code()
        super().__init__(
            exc.details() or self.code.name, reason=detail.reason or self.code.name.lower(), field=detail.field
        )
        if self.code == grpc.StatusCode.UNAVAILABLE:
            self.message = f"{method.split('/')[1]} is unavailable: {self.message}"


def step_kind(step: pipeline_pb2.Step) -> str:
    kind = step.WhichOneof("op")
    if kind is None:
        raise InvalidArgument("every step needs an op (upscale, remove_background or effect)", field="steps")
    return kind


def output_header(op: TileOp, info: wire.HeaderInfo) -> common_pb2.ImageHeader:
    # Cells no bigger than one job's output, so a finished job's tiles leave at once.
    return wire.grid_header(
        op.out_width,
        op.out_height,
        op.out_mode,
        op.out_dtype,
        icc_profile=info.msg.icc_profile,
        source_format=info.msg.source_format,
        max_cell=getattr(op, "preferred_cell", 1 << 30),
    )


async def input_tiles(requests: AsyncIterator, info: wire.HeaderInfo) -> AsyncIterator[tuple[Rect, np.ndarray]]:
    """The input tiles of a stream after its start, each checked against its header."""
    async for message in requests:
        if message.WhichOneof("part") != "tile":
            raise InvalidArgument("only tiles may follow the start message", field="tile")
        yield wire.tile_pixels(message.tile, info)


def incomplete(buffer: TileBuffer) -> StreamEndedEarly:
    return StreamEndedEarly(f"the stream ended with {buffer.missing} input tiles missing", field="tile")


async def receive_whole(requests: AsyncIterator, info: wire.HeaderInfo) -> np.ndarray:
    """The whole input image of a stream, once its last tile has come."""
    buffer = TileBuffer(info.width, info.height, info.channels, info.dtype, info.msg.tile_width, info.msg.tile_height)
    async for rect, pixels in input_tiles(requests, info):
        buffer.add(rect, pixels)
    if not buffer.complete:
        raise incomplete(buffer)
    return buffer.read(Rect(0, 0, info.width, info.height))


async def render_stream(
    plan: StepPlan,
    info: wire.HeaderInfo,
    requests: AsyncIterator,
    admission: Admission,
    emit: Callable[[common_pb2.Tile], Awaitable[None]],
) -> None:
    """Consume input tiles, render the op, emit output tiles on the output grid;
    fills the plan's report with tile count and timings."""
    op, report = plan.op, plan.report
    started = time.perf_counter()
    out_header = output_header(op, info)
    buffer = TileBuffer(info.width, info.height, info.channels, info.dtype, info.msg.tile_width, info.msg.tile_height)
    assembler = GridAssembler(
        op.out_width,
        op.out_height,
        wire.MODE_CHANNELS[op.out_mode],
        op.out_dtype,
        out_header.tile_width,
        out_header.tile_height,
    )
    together = op.tiles_together if isinstance(op, RendersTogether) else 1
    ready_jobs = op.ready if isinstance(op, RendersTogether) else lambda jobs: None
    # Jobs whose context has come, read ahead of rendering; up to `together` renderers take them,
    # each the next as soon as its own is done (none waits for another's job to end).
    ready: asyncio.Queue = asyncio.Queue(2 * together)
    wanted = 0  # jobs queued or rendering
    computing, compute, busy_since = 0, 0.0, 0.0
    rendered: asyncio.Queue = asyncio.Queue(together)  # outputs leave from one task while the next jobs render

    def want(change: int) -> None:
        nonlocal wanted
        wanted += change
        ready_jobs(wanted)

    async def run(fn, *args):
        """`fn` in the stream's compute slot; the report's compute time counts time with any running."""
        nonlocal computing, compute, busy_since
        if not computing:
            busy_since = time.perf_counter()
        computing += 1
        try:
            return await admission.compute(fn, *args)
        finally:
            computing -= 1
            if not computing:
                compute += time.perf_counter() - busy_since

    async def queue(job: Rect, context: np.ndarray) -> None:
        await ready.put((job, context))
        want(+1)

    async def renderer() -> None:
        while (item := await ready.get()) is not _END:
            if isinstance(item, BaseException):
                ready.put_nowait(item)  # for the other renderers too
                raise item
            job, context = item
            try:
                t = time.perf_counter()
                out = await run(op.render, job, context)
                plan.observe(time.perf_counter() - t)
            finally:
                want(-1)
            report.tiles += 1
            await rendered.put((job, out))
        ready.put_nowait(_END)  # for the other renderers too

    async def sender() -> None:
        while (item := await rendered.get()) is not _END:
            job, out = item
            for cell, pixels in assembler.add(op.output_rect(job), out):
                await emit(wire.tile(cell, pixels))

    async def read() -> None:
        # Each job waits for the input cells its context touches; each cell is kept until
        # the last job that needs it has been queued: work per tile stays constant, whatever
        # the number of jobs (a rescan of every pending job per tile was quadratic).
        contexts = [] if op.whole_image else [op.context_rect(job) for job in op.jobs]
        missing = [0] * len(contexts)
        needed_by: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, context in enumerate(contexts):
            for key in buffer.cell_keys(context):
                needed_by[key].append(index)
                missing[index] += 1
        users = {key: len(jobs) for key, jobs in needed_by.items()}
        queued = 0
        async for rect, pixels in input_tiles(requests, info):
            buffer.add(rect, pixels)
            if op.whole_image:
                if buffer.complete:
                    whole = buffer.read(Rect(0, 0, info.width, info.height))
                    buffer.release([])
                    await run(op.prepare, whole)
                    for job in op.jobs:
                        await queue(job, whole)
                    queued = len(op.jobs)
                continue
            (key,) = buffer.cell_keys(rect)  # a tile is one cell of the grid
            if not users.get(key):
                buffer.drop(key)
            for index in needed_by.get(key, ()):
                missing[index] -= 1
                if missing[index]:
                    continue
                await queue(op.jobs[index], buffer.read(contexts[index]))
                queued += 1
                for used in buffer.cell_keys(contexts[index]):
                    users[used] -= 1
                    if not users[used]:
                        buffer.drop(used)
        if queued < len(op.jobs) or not buffer.complete:
            raise incomplete(buffer)

    async def reader() -> None:
        try:
            await read()
            await ready.put(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the renderers, which raise it
            await ready.put(exc)

    async def render_all() -> None:
        renderers = [asyncio.create_task(renderer()) for _ in range(together)]
        try:
            await asyncio.gather(*renderers)
        finally:
            for task in renderers:
                task.cancel()
            await asyncio.gather(*renderers, return_exceptions=True)
        await rendered.put(_END)

    tasks = [asyncio.create_task(reader()), asyncio.create_task(render_all()), asyncio.create_task(sender())]
    try:
        done, _ = await asyncio.wait(tasks[1:], return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if (error := task.exception()) is not None:
                raise error
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ready_jobs(0)
    report.compute_ms = compute * 1000
    report.total_ms = (time.perf_counter() - started) * 1000
    admission.finish()


class Downstreams:
    """gRPC channels to the next steps' services, made in the serving loop."""

    def __init__(self, addresses: Mapping[str, str]):
        self.addresses = addresses
        self._channels: dict[str, grpc.aio.Channel] = {}

    def call(self, kind: str, timeout: float | None) -> grpc.aio.StreamStreamCall:
        """A call to the service of a kind of step, its requests to be written (see Sender)."""
        address = self.addresses[BY_STEP[kind].name]
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(
                channel_target(address), options=CHANNEL_OPTIONS
            )
        method = channel.stream_stream(
            BY_STEP[kind].method,
            request_serializer=pipeline_pb2.StreamRequest.SerializeToString,
            response_deserializer=pipeline_pb2.StreamResponse.FromString,
        )
        metadata = ((logs.REQUEST_ID_HEADER, logs.request_id_var.get()), (HOP_HEADER, "1"))
        return method(timeout=timeout, metadata=metadata)


def check_output_size(width: int, height: int, limit: int, step: str = "") -> None:
    """Refuse an output over the limit. A service checks each step's output with
    this before it builds anything for it (a plan's jobs grow with the output)."""
    if width * height > limit:
        where = f" after {step}" if step else ""
        raise LimitExceeded(
            f"the output{where} would be {width}x{height} = {width * height} pixels; the limit is {limit}",
            reason="output_too_large",
        )


async def read_start(requests: AsyncIterator, timeout: float) -> pipeline_pb2.StreamStart:
    """A stream's first message, which must be its StreamStart and arrive within
    `timeout` seconds: a client that opens a stream and sends nothing is not kept."""
    try:
        first = await asyncio.wait_for(anext(requests, None), timeout)
    except asyncio.TimeoutError:
        raise StreamTimeout(f"no StreamStart within {timeout:g} s of opening the stream", field="start") from None
    if first is None:
        raise StreamEndedEarly("the stream ended before its StreamStart message", field="start")
    if first.WhichOneof("part") != "start":
        raise InvalidArgument("the stream must begin with a StreamStart message", field="start")
    return first.start


async def within_idle_timeout(requests: AsyncIterator, seconds: float) -> AsyncIterator:
    """The stream's messages after its start, heartbeats left out; a client that sends
    nothing at all for `seconds` is not kept waiting for."""
    while True:
        try:
            message = await asyncio.wait_for(anext(requests, None), seconds)
        except asyncio.TimeoutError:
            raise StreamTimeout(
                f"nothing arrived for {seconds:g} s; the stream is ended (a sender still computing sends heartbeats)",
                field="tile",
            ) from None
        if message is None:
            return
        if message.WhichOneof("part") != "heartbeat":
            yield message


async def open_stream(
    request_iterator: AsyncIterable[pipeline_pb2.StreamRequest], config: ServiceConfig
) -> tuple[pipeline_pb2.StreamStart, AsyncIterator[pipeline_pb2.StreamRequest]]:
    """A stream's start message, and its further messages, each within the configured timeouts."""
    requests = aiter(request_iterator)
    start = await read_start(requests, config.stream_start_timeout_seconds)
    return start, within_idle_timeout(requests, config.stream_idle_timeout_seconds)


class StepServicer(Protocol):
    """A service's servicer, as its streaming RPCs' shared body uses it."""

    runtime: ServiceRuntime
    downstreams: "Downstreams"

    def plan_step(self, start: pipeline_pb2.StreamStart, info: wire.HeaderInfo) -> StepPlan: ...


async def serve_stream(
    servicer: StepServicer,
    request_iterator: AsyncIterable[pipeline_pb2.StreamRequest],
    context: grpc.aio.ServicerContext,
    *,
    method: str,
):
    """The body of a service's streaming RPC (an async generator of StreamResponse):
    the start is read and checked, and the step planned, before the stream is admitted."""
    config, limiter, downstreams = servicer.runtime.config, servicer.runtime.limiter, servicer.downstreams
    started = time.perf_counter()
    start, requests = await open_stream(request_iterator, config)
    if not start.steps:
        raise InvalidArgument("steps must hold at least one step", field="steps")
    if len(start.steps) > MAX_STEPS:
        raise InvalidArgument(f"at most {MAX_STEPS} steps, got {len(start.steps)}", field="steps")
    for step in start.steps:
        step_kind(step)
    info = wire.HeaderInfo(start.image, config.max_input_pixels)
    plan = servicer.plan_step(start, info)
    op = plan.op
    check_output_size(op.out_width, op.out_height, config.max_output_pixels)
    wire.HeaderInfo(output_header(op, info), config.max_output_pixels)  # its grid within the contract too
    rest = list(start.steps[plan.steps_used :])
    out: asyncio.Queue = asyncio.Queue(QUEUE_MESSAGES)

    async def emit_local(tile: common_pb2.Tile) -> None:
        await out.put(pipeline_pb2.StreamResponse(tile=tile))

    async def local() -> None:
        await out.put(
            pipeline_pb2.StreamResponse(
                result=pipeline_pb2.StreamResult(image=output_header(op, info), steps=[plan.report])
            )
        )
        if admission is None:  # a check only (validate_only): nothing is rendered
            return
        await render_stream(plan, info, requests, admission, emit_local)
        await out.put(
            pipeline_pb2.StreamResponse(
                summary=pipeline_pb2.StreamSummary(steps=[plan.report], total_ms=(time.perf_counter() - started) * 1000)
            )
        )

    async def forwarded() -> None:
        kind = step_kind(rest[0])
        to_next: asyncio.Queue = asyncio.Queue(QUEUE_MESSAGES)

        async def emit_next(tile: common_pb2.Tile) -> None:
            await to_next.put(pipeline_pb2.StreamRequest(tile=tile))

        call = downstreams.call(kind, context.time_remaining())
        sender = Sender(
            call,
            pipeline_pb2.StreamRequest(
                start=pipeline_pb2.StreamStart(
                    image=output_header(op, info), steps=rest, validate_only=start.validate_only
                )
            ),
            until_end(to_next),
        )

        async def feed() -> None:
            if admission is not None:  # else a check only (validate_only): nothing is rendered
                await render_stream(plan, info, requests, admission, emit_next)
            await to_next.put(_END)

        def feeding_error() -> BaseException | None:
            return feeding.exception() if feeding.done() and not feeding.cancelled() else None

        feeding = asyncio.create_task(feed())
        feeding.add_done_callback(lambda task: task.cancelled() or task.exception() and call.cancel())
        try:
            async for reply in call:
                part = reply.WhichOneof("part")
                if part == "result":
                    sender.accepted.set()
                    reply.result.steps.insert(0, plan.report)
                elif part == "summary":
                    await feeding  # our own report is complete once our last tile left
                    reply.summary.steps.insert(0, plan.report)
                    reply.summary.total_ms = (time.perf_counter() - started) * 1000
                await out.put(reply)
        except grpc.aio.AioRpcError as exc:
            if (error := feeding_error()) is not None:
                raise error from None
            raise RelayedError(exc, BY_STEP[kind].method) from None
        except asyncio.CancelledError:
            if (error := feeding_error()) is not None:
                raise error from None
            raise
        finally:
            call.cancel()
            feeding.cancel()
            await sender.close()
        await feeding

    async def produce() -> None:
        try:
            await (forwarded() if rest else local())
            await out.put(_END)
        except BaseException as exc:  # handed to the RPC task, which raises it
            await out.put(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise

    hop = any(key == HOP_HEADER for key, _ in context.invocation_metadata() or ())
    admission = None if start.validate_only else limiter.admit(method, hop)
    producer = asyncio.create_task(produce())
    try:
        while (item := await out.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        if admission:
            admission.finish()
        producer.cancel()
        try:
            await producer
        except BaseException:
            pass
