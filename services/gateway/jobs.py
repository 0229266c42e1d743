"""Asynchronous jobs: a bounded queue, a fixed number of workers, progress as
tiles done over tiles total, events for listeners, results in the store."""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from services.common import logs
from services.common.errors import quoted

from .errors import HttpError
from .store import Stored

logger = logging.getLogger("imagemesh.gateway.jobs")

# (upload, steps, format, quality, bytes needed, progress callback) -> core.StoredRun
Runner = Callable[..., Awaitable]


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
    steps: list[dict] = field(default_factory=list)
    timings_ms: dict = field(default_factory=dict)
    error: dict | None = None
    result: Stored | None = None
    version: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition, repr=False)

    def view(self, base_url: str = "") -> dict:
        out = {"id": self.id, "status": self.status, "status_url": f"{base_url}/v1/jobs/{self.id}",
               "progress": {"tiles_done": self.tiles_done, "tiles_total": self.tiles_total,
                            "fraction": round(self.tiles_done / self.tiles_total, 4) if self.tiles_total else 0.0},
               "created_at": _iso(self.created), "started_at": _iso(self.started),
               "finished_at": _iso(self.finished), "steps": self.steps, "timings_ms": self.timings_ms}
        if self.error:
            out["error"] = self.error
        if self.result:
            out["result_url"] = f"{base_url}/v1/jobs/{self.id}/result"
            out["expires_at"] = _iso(self.result.expires_at)
        return out

    async def touch(self) -> None:
        async with self.changed:
            self.version += 1
            self.changed.notify_all()


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


@dataclass
class _Work:
    job: Job
    data: bytes  # the upload as sent: a queued job holds no decoded pixels
    steps: list
    fmt: str
    quality: int
    needs: int   # bytes of decoded pixels its run will hold


class JobManager:
    def __init__(self, run: Runner, *, workers: int, queue_size: int):
        self.run, self.worker_count = run, workers
        self.queue: asyncio.Queue[_Work] = asyncio.Queue(queue_size)
        self.jobs: dict[str, Job] = {}
        self._workers: list[asyncio.Task] = []

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work()) for _ in range(self.worker_count)]

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    def submit(self, data: bytes, steps: list, fmt: str, quality: int, needs: int) -> Job:
        job = Job(secrets.token_hex(16), logs.request_id_var.get())
        try:
            self.queue.put_nowait(_Work(job, data, steps, fmt, quality, needs))
        except asyncio.QueueFull:
            raise HttpError(429, "queue_full", f"{self.queue.maxsize} jobs are already waiting; retry later",
                            {"Retry-After": "5"}) from None
        self.jobs[job.id] = job
        return job

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise HttpError(404, "job_not_found", f"no job {quoted(job_id)} (unknown, or its result expired)")
        return job

    def forget_expired(self, now: float) -> None:
        for job_id in [j.id for j in self.jobs.values() if j.result and j.result.expires_at <= now
                       or j.status == "failed" and j.finished and j.finished + 3600 <= now]:
            del self.jobs[job_id]

    async def _work(self) -> None:
        while True:
            work = await self.queue.get()
            job = work.job
            token = logs.request_id_var.set(job.request_id)
            job.status, job.started = "running", time.time()
            await job.touch()

            async def progress(done: int, total: int) -> None:
                job.tiles_done, job.tiles_total = done, total
                await job.touch()
            try:
                run = await self.run(work.data, work.steps, work.fmt, work.quality, work.needs, progress)
                job.result, job.steps, job.timings_ms = run.stored, run.steps, run.timings_ms
                job.status = "done"
            except HttpError as exc:
                job.status, job.error = "failed", {"code": exc.reason, "message": exc.message, "status": exc.status}
            except Exception:
                logger.exception("job %s failed", job.id)
                job.status, job.error = "failed", {"code": "internal", "message": "internal error", "status": 500}
            finally:
                job.finished = time.time()
                del work
                await job.touch()
                logs.request_id_var.reset(token)
