"""Asynchronous jobs: a bounded queue shared by every gateway replica, a fixed
number of workers in each, progress as tiles done over tiles total, results in
the result store. Where the queue and the jobs live is the state's concern
(state.py): this process, or Redis."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from imagemesh.v1 import pipeline_pb2

from services.common import logs
from services.common.errors import quoted

from .errors import HttpError
from .store import Stored

logger = logging.getLogger("imagemesh.gateway.jobs")

# (upload, steps, format, quality, bytes needed, progress callback) -> core.StoredRun
Runner = Callable[..., Awaitable]

# A job whose replica stopped is run again once; stopped twice, it fails with a reason.
MAX_JOB_ATTEMPTS = 2
PROGRESS_SAVE_SECONDS = 0.25  # progress is saved (and told to listeners) at most this often
FINISHED = ("done", "failed")


@dataclass
class Job:
    id: str
    request_id: str
    status: str = "queued"  # queued, running, done, failed
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    tiles_done: int = 0
    tiles_total: int = 0
    tiles_at: float | None = None  # when tiles_done last moved
    estimated_seconds: float = 0.0  # its run, from the services' measured speeds (estimate.py)
    steps: list[dict] = field(default_factory=list)
    timings_ms: dict = field(default_factory=dict)
    error: dict | None = None
    result: Stored | None = None
    attempts: int = 0
    version: int = 0

    def timing(self, now: float) -> tuple[float, float | None]:
        """(fraction done, seconds left; None when unknown). The fraction moves inside a tile
        too, with the time spent against the estimate, and never goes back (both terms only
        grow); the time left comes from the tiles done so far once there are some."""
        if self.status == "done":
            return 1.0, 0.0
        by_tiles = self.tiles_done / self.tiles_total if self.tiles_total else 0.0
        if self.status == "failed":
            return by_tiles, None
        if self.status == "queued" or not self.started:
            return 0.0, (round(self.estimated_seconds, 2) if self.estimated_seconds else None)
        elapsed = max(0.0, now - self.started)
        by_time = min(elapsed / self.estimated_seconds, 0.99) if self.estimated_seconds else 0.0
        if self.tiles_done and self.tiles_total and self.tiles_at:
            expected = (self.tiles_at - self.started) / self.tiles_done * self.tiles_total
        else:
            expected = self.estimated_seconds
        eta = round(max(expected - elapsed, 0.0), 2) if expected else None
        return max(by_tiles, by_time), eta

    def view(self, base_url: str = "") -> dict:
        fraction, eta = self.timing(time.time())
        out = {
            "id": self.id,
            "status": self.status,
            "status_url": f"{base_url}/v1/jobs/{self.id}",
            "progress": {
                "tiles_done": self.tiles_done,
                "tiles_total": self.tiles_total,
                "fraction": round(fraction, 4),
            },
            "eta_seconds": eta,
            "estimated_seconds": round(self.estimated_seconds, 2),
            "created_at": _iso(self.created),
            "started_at": _iso(self.started),
            "finished_at": _iso(self.finished),
            "attempts": self.attempts,
            "steps": self.steps,
            "timings_ms": self.timings_ms,
        }
        if self.error:
            out["error"] = self.error
        if self.result:
            out["result_url"] = f"{base_url}/v1/jobs/{self.id}/result"
            out["expires_at"] = _iso(self.result.expires_at)
        return out

    def record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Job:
        result = record.pop("result", None)
        return cls(**record, result=Stored(**result) if result else None)

    def fail(self, code: str, message: str, status: int) -> None:
        self.status, self.error, self.finished = (
            "failed",
            {"code": code, "message": message, "status": status},
            time.time(),
        )


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


@dataclass
class Work:
    """What a queued job runs: the upload as sent (a queued job holds no decoded pixels)."""

    job_id: str
    data: bytes
    steps: list[pipeline_pb2.Step]
    fmt: str
    quality: int
    needs: int  # bytes of decoded pixels its run will hold

    def fields(self) -> dict[str, bytes | str | int]:
        return {
            "job": self.job_id,
            "data": self.data,
            "fmt": self.fmt,
            "quality": self.quality,
            "needs": self.needs,
            "steps": pipeline_pb2.StreamStart(steps=self.steps).SerializeToString(),
        }

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Work:
        return cls(
            fields[b"job"].decode(),
            fields[b"data"],
            list(pipeline_pb2.StreamStart.FromString(fields[b"steps"]).steps),
            fields[b"fmt"].decode(),
            int(fields[b"quality"]),
            int(fields[b"needs"]),
        )


class JobManager:
    """Submits jobs to the shared queue, and runs `workers` of them at once from it."""

    def __init__(self, run: Runner, state, *, workers: int, queue_size: int):
        self.run, self.state, self.worker_count, self.queue_size = run, state, workers, queue_size
        self._workers: list[asyncio.Task] = []

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(self.state.consumer_name(n))) for n in range(self.worker_count)]

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    async def submit(
        self, data: bytes, steps: list, fmt: str, quality: int, needs: int, estimated_seconds: float = 0.0
    ) -> Job:
        job = Job(secrets.token_hex(16), logs.request_id_var.get(), estimated_seconds=estimated_seconds)
        if not await self.state.enqueue(job, Work(job.id, data, steps, fmt, quality, needs), self.queue_size):
            raise HttpError(
                429, "queue_full", f"{self.queue_size} jobs are already waiting; retry later", {"Retry-After": "5"}
            )
        return job

    async def get(self, job_id: str) -> Job:
        job = await self.state.load_job(job_id)
        if job is None:
            raise HttpError(404, "job_not_found", f"no job {quoted(job_id)} (unknown, or its result expired)")
        return job

    async def watch(self, job_id: str, keepalive: float) -> AsyncIterator[Job | None]:
        """The job now, then again at each change; None after `keepalive` seconds without one."""
        await self.get(job_id)
        async for job in self.state.watch_job(job_id, keepalive):
            yield job

    async def _work(self, consumer: str) -> None:
        while True:
            try:
                claimed = await self.state.take(consumer)
                if claimed is not None and await self._run(claimed):
                    await self.state.finish(claimed)
            except HttpError as exc:  # the shared state is unreachable: try again shortly
                logs.log(logger, logging.WARNING, "job queue unavailable", error=exc.message)
                await asyncio.sleep(1)

    async def _run(self, claimed) -> bool:
        """Run a job taken from the queue; False when another replica has taken it over."""
        work = claimed.work
        job = await self.state.load_job(work.job_id)
        if job is None or job.status in FINISHED:
            return True  # expired, or finished by a replica that was thought gone
        token = logs.request_id_var.set(job.request_id)
        try:
            if job.attempts >= MAX_JOB_ATTEMPTS:
                job.fail(
                    "gateway_lost",
                    f"the gateway replica running this job stopped {job.attempts} times; submit it again",
                    503,
                )
                await self.state.save_job(job)
                return True
            job.status, job.started, job.attempts = "running", time.time(), job.attempts + 1
            job.tiles_done, job.tiles_at = 0, None  # a run taken over starts its tiles (and their timing) again
            await self.state.save_job(job)
            run = asyncio.create_task(self._execute(job, work))
            try:
                while not (await asyncio.wait({run}, timeout=self.state.keepalive_seconds))[0]:
                    if not await self.state.keep(claimed):
                        logs.log(logger, logging.WARNING, "job taken over by another replica", job=job.id)
                        return False
                await run
            finally:
                if not run.done():
                    run.cancel()
                    await asyncio.gather(run, return_exceptions=True)
            await self.state.save_job(job)
            return True
        finally:
            logs.request_id_var.reset(token)

    async def _execute(self, job: Job, work: Work) -> None:
        saved = time.monotonic()

        async def progress(done: int, total: int) -> None:
            nonlocal saved
            if done != job.tiles_done:
                job.tiles_at = time.time()
            job.tiles_done, job.tiles_total = done, total
            if done == total or time.monotonic() - saved >= PROGRESS_SAVE_SECONDS:
                saved = time.monotonic()
                await self.state.save_job(job)

        try:
            run = await self.run(work.data, work.steps, work.fmt, work.quality, work.needs, progress)
            job.result, job.steps, job.timings_ms = run.stored, run.steps, run.timings_ms
            job.status, job.finished = "done", time.time()
        except HttpError as exc:
            job.fail(exc.reason, exc.message, exc.status)
        except Exception:
            logger.exception("job %s failed", job.id)
            job.fail("internal", "internal error", 500)
