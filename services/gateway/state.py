"""What every gateway replica must see alike: the job queue and the jobs, the
rate-limit buckets and the finished results.

`LocalState` keeps them in this process (and results in a directory): one
gateway, nothing to install. `RedisState` (REDIS_URL) keeps them in Redis, so
that any replica answers any request and a job outlives the replica that ran
it: the queue is a stream read by a consumer group (one consumer per worker),
a running job's entry stays pending until it is acknowledged, its worker
renews it, and an entry left idle by a replica that stopped is claimed by
another replica's worker (XAUTOCLAIM). The same JobManager drives both."""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from .auth import RateLimiter, rate_limited
from .config import GatewayConfig
from .errors import HttpError
from .jobs import FINISHED, Job, Work
from .store import DirectoryResults, Stored, new_file_id, valid_file_id

FAILED_JOB_TTL_SECONDS = 3600  # how long a failed job can still be read
ACTIVE_JOB_TTL_SECONDS = 86400  # a queued or running job's record in Redis, renewed at each change
TAKE_BLOCK_SECONDS = 2.0  # how long a worker waits for new work before looking for abandoned work
STALE_CONSUMER_SECONDS = 3600  # a queue consumer idle this long, holding nothing, belonged to a stopped replica


def job_expires_at(job: Job) -> float | None:
    """When a finished job is forgotten (never, while it is queued or running)."""
    if job.status == "done" and job.result:
        return job.result.expires_at
    if job.status == "failed":
        return (job.finished or time.time()) + FAILED_JOB_TTL_SECONDS
    return None


@dataclass
class Claimed:
    work: Work
    consumer: str = ""
    entry_id: bytes = b""  # the stream entry (Redis)


class LocalState:
    """One gateway: an asyncio queue, jobs and token buckets in memory, results in RESULT_DIR."""

    keepalive_seconds = None  # nobody else could take a job over

    def __init__(self, result_dir: Path, result_ttl: float, rate_per_minute: float, burst: int):
        self.results = DirectoryResults(result_dir, result_ttl)
        self.limiter = RateLimiter(rate_per_minute, burst)
        self._queue: asyncio.Queue[Work] = asyncio.Queue()
        self._jobs: dict[str, dict] = {}
        self._changed: dict[str, asyncio.Condition] = {}
        self._running = 0

    async def close(self) -> None:
        pass

    @staticmethod
    def consumer_name(worker: int) -> str:
        return f"worker-{worker}"

    async def check_rate(self, identity: str) -> None:
        self.limiter.check(identity)

    async def enqueue(self, job: Job, work: Work, limit: int) -> bool:
        if self._queue.qsize() >= limit:
            return False
        self._changed[job.id] = asyncio.Condition()
        await self.save_job(job)
        self._queue.put_nowait(work)
        return True

    async def take(self, consumer: str) -> Claimed:
        work = await self._queue.get()
        self._running += 1
        return Claimed(work)

    async def keep(self, claimed: Claimed) -> bool:
        return True

    async def finish(self, claimed: Claimed) -> None:
        self._running -= 1

    async def save_job(self, job: Job) -> None:
        job.version += 1
        self._jobs[job.id] = job.record()
        changed = self._changed[job.id]
        async with changed:
            changed.notify_all()

    async def load_job(self, job_id: str) -> Job | None:
        record = self._jobs.get(job_id)
        return None if record is None else Job.from_record(dict(record))

    async def watch_job(self, job_id: str, keepalive: float) -> AsyncIterator[Job | None]:
        changed, seen = self._changed[job_id], -1
        while True:
            async with changed:
                try:
                    await asyncio.wait_for(
                        changed.wait_for(lambda: self._jobs.get(job_id, {}).get("version") != seen), keepalive
                    )
                except asyncio.TimeoutError:
                    yield None
                    continue
            job = await self.load_job(job_id)
            if job is None:  # forgotten meanwhile
                return
            seen = job.version
            yield job
            if job.status in FINISHED:
                return

    async def job_counts(self) -> dict[str, int]:
        return {"queued": self._queue.qsize(), "running": self._running}

    async def put_result(self, data: bytes, fmt: str) -> Stored:
        return await self.results.put(data, fmt)

    async def get_result(self, file_id: str) -> tuple[Stored, bytes] | None:
        return await self.results.get(file_id)

    async def sweep(self) -> None:
        await self.results.sweep()
        now = time.time()
        for job_id in [
            job_id
            for job_id, record in self._jobs.items()
            if (job_expires_at(Job.from_record(dict(record))) or now + 1) <= now
        ]:
            del self._jobs[job_id], self._changed[job_id]


def _state_errors(method):
    """Redis unreachable or failing: a 503 that says so (the worker loop retries)."""

    @functools.wraps(method)
    async def wrapper(*args, **kwargs):
        try:
            return await method(*args, **kwargs)
        except RedisError as exc:
            raise HttpError(
                503, "state_unavailable", f"the shared state (Redis) failed: {exc}", {"Retry-After": "5"}
            ) from None

    return wrapper


# A token bucket, atomic in Redis, on Redis's clock (so that replicas agree).
RATE_SCRIPT = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(bucket[1]) or burst
local at = tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {allowed, tostring(tokens)}
"""


class RedisState:
    """Replicas: everything in Redis under the `imagemesh:` prefix."""

    QUEUE, GROUP = b"imagemesh:jobs", b"gateways"

    def __init__(self, url: str, result_ttl: float, rate_per_minute: float, burst: int, claim_seconds: float):
        # Untyped here on purpose: redis-py's annotations describe RESP3 replies (dicts) for stream
        # commands whose RESP2 replies, what this client gets, are lists; the tests run a real server.
        self.redis: Any = aioredis.from_url(url, socket_connect_timeout=5, health_check_interval=30)
        self.result_ttl, self.rate, self.burst = result_ttl, rate_per_minute / 60.0, burst
        self.claim_ms = int(claim_seconds * 1000)
        self.keepalive_seconds = claim_seconds / 3
        self.instance = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._rate_script = self.redis.register_script(RATE_SCRIPT)
        self._group_ready = False

    async def close(self) -> None:
        await self.redis.aclose()

    def consumer_name(self, worker: int) -> str:
        return f"{self.instance}-{worker}"

    @staticmethod
    def _job_key(job_id: str) -> str:
        return f"imagemesh:job:{job_id}"

    @staticmethod
    def _changes_key(job_id: str) -> str:
        return f"imagemesh:job:{job_id}:changes"

    @staticmethod
    def _result_key(file_id: str) -> str:
        return f"imagemesh:result:{file_id}"

    async def _ensure_group(self) -> None:
        if not self._group_ready:
            try:
                await self.redis.xgroup_create(self.QUEUE, self.GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._group_ready = True

    @_state_errors
    async def check_rate(self, identity: str) -> None:
        if self.rate <= 0:
            return
        allowed, tokens = await self._rate_script(keys=[f"imagemesh:rate:{identity}"], args=[self.rate, self.burst])
        if not allowed:
            raise rate_limited(float(tokens), self.rate)

    @_state_errors
    async def enqueue(self, job: Job, work: Work, limit: int) -> bool:
        await self._ensure_group()
        if (await self.job_counts())["queued"] >= limit:
            return False
        await self.save_job(job)
        await self.redis.xadd(self.QUEUE, work.fields())
        return True

    @_state_errors
    async def take(self, consumer: str) -> Claimed | None:
        """Work left idle past the claim time by a stopped replica first, else new work."""
        await self._ensure_group()
        _, entries, _ = await self.redis.xautoclaim(self.QUEUE, self.GROUP, consumer, self.claim_ms, count=1)
        if not entries:
            streams = await self.redis.xreadgroup(
                self.GROUP, consumer, {self.QUEUE: ">"}, count=1, block=int(TAKE_BLOCK_SECONDS * 1000)
            )
            entries = streams[0][1] if streams else []
        for entry_id, fields in entries:
            if fields:
                return Claimed(Work.from_fields(fields), consumer, entry_id)
            await self._drop(entry_id)  # deleted under us: nothing to run
        return None

    @_state_errors
    async def keep(self, claimed: Claimed) -> bool:
        """Renew a running job's entry; False when another replica has claimed it."""
        consumer_entries = await self.redis.xpending_range(
            self.QUEUE, self.GROUP, min=claimed.entry_id, max=claimed.entry_id, count=1, consumername=claimed.consumer
        )
        if not consumer_entries:
            return False
        await self.redis.xclaim(self.QUEUE, self.GROUP, claimed.consumer, 0, [claimed.entry_id], justid=True)
        return True

    @_state_errors
    async def finish(self, claimed: Claimed) -> None:
        await self._drop(claimed.entry_id)

    async def _drop(self, entry_id: bytes) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.xack(self.QUEUE, self.GROUP, entry_id).xdel(self.QUEUE, entry_id).execute()

    @_state_errors
    async def save_job(self, job: Job) -> None:
        job.version += 1
        expires_at = job_expires_at(job)
        ttl = ACTIVE_JOB_TTL_SECONDS if expires_at is None else max(1, math.ceil(expires_at - time.time()))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._job_key(job.id), json.dumps(job.record()), ex=ttl)
            pipe.xadd(self._changes_key(job.id), {"version": job.version}, maxlen=8, approximate=True)
            pipe.expire(self._changes_key(job.id), ttl)
            await pipe.execute()

    @_state_errors
    async def load_job(self, job_id: str) -> Job | None:
        record = await self.redis.get(self._job_key(job_id))
        return None if record is None else Job.from_record(json.loads(record))

    async def watch_job(self, job_id: str, keepalive: float) -> AsyncIterator[Job | None]:
        last = await self._latest_change(job_id)
        job = await self.load_job(job_id)  # at least as new as `last`
        while job is not None:
            yield job
            if job.status in FINISHED:
                return
            changes = await self._changes_after(job_id, last, keepalive)
            if not changes:
                yield None
                continue
            last = changes[-1][0]
            job = await self.load_job(job_id)

    @_state_errors
    async def _latest_change(self, job_id: str) -> bytes:
        newest = await self.redis.xrevrange(self._changes_key(job_id), count=1)
        return newest[0][0] if newest else b"0-0"

    @_state_errors
    async def _changes_after(self, job_id: str, last: bytes, wait: float) -> list:
        streams = await self.redis.xread({self._changes_key(job_id): last}, block=int(wait * 1000))
        return streams[0][1] if streams else []

    @_state_errors
    async def job_counts(self) -> dict[str, int]:
        await self._ensure_group()
        async with self.redis.pipeline(transaction=False) as pipe:
            entries, pending = await pipe.xlen(self.QUEUE).xpending(self.QUEUE, self.GROUP).execute()
        return {"queued": max(0, entries - pending["pending"]), "running": pending["pending"]}

    @_state_errors
    async def put_result(self, data: bytes, fmt: str) -> Stored:
        file_id = new_file_id()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._result_key(file_id), mapping={"format": fmt, "data": data})
            pipe.pexpire(self._result_key(file_id), int(self.result_ttl * 1000))
            await pipe.execute()
        return Stored(file_id, fmt, time.time() + self.result_ttl)

    @_state_errors
    async def get_result(self, file_id: str) -> tuple[Stored, bytes] | None:
        if not valid_file_id(file_id):
            return None
        async with self.redis.pipeline(transaction=True) as pipe:
            (fmt, data), ttl_ms = (
                await pipe.hmget(self._result_key(file_id), "format", "data").pttl(self._result_key(file_id)).execute()
            )
        if fmt is None or data is None or ttl_ms <= 0:
            return None
        return Stored(file_id, fmt.decode(), time.time() + ttl_ms / 1000), data

    @_state_errors
    async def sweep(self) -> None:
        """Keys expire by themselves; the consumers of replicas long gone are forgotten
        (a live worker reads the queue every TAKE_BLOCK_SECONDS, so it is never idle long)."""
        await self._ensure_group()
        for consumer in await self.redis.xinfo_consumers(self.QUEUE, self.GROUP):
            if consumer["pending"] == 0 and consumer["idle"] > STALE_CONSUMER_SECONDS * 1000:
                await self.redis.xgroup_delconsumer(self.QUEUE, self.GROUP, consumer["name"])


def open_state(config: GatewayConfig) -> LocalState | RedisState:
    if config.redis_url:
        return RedisState(
            config.redis_url,
            config.result_ttl_seconds,
            config.rate_limit_per_minute,
            config.rate_limit_burst,
            config.job_claim_seconds,
        )
    return LocalState(
        Path(config.result_dir), config.result_ttl_seconds, config.rate_limit_per_minute, config.rate_limit_burst
    )
