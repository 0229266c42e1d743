"""Finished images kept for a while under an unguessable id: in a directory
(one gateway, or replicas sharing a volume: expiry follows the file's age), or
in Redis (any replica serves any result; expiry is the key's)."""

from __future__ import annotations

import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from services.common.imageio import MEDIA_TYPES

_ID = re.compile(r"^[0-9a-f]{32}$")


def new_file_id() -> str:
    return secrets.token_hex(16)


def valid_file_id(file_id: str) -> bool:
    return bool(_ID.match(file_id))


@dataclass
class Stored:
    file_id: str
    format: str
    expires_at: float  # epoch seconds

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]


class DirectoryResults:
    def __init__(self, directory: Path, ttl_seconds: float):
        self.directory, self.ttl = Path(directory), ttl_seconds
        self.directory.mkdir(parents=True, exist_ok=True)

    async def put(self, data: bytes, fmt: str) -> Stored:
        return await run_in_threadpool(self._put, data, fmt)

    async def get(self, file_id: str) -> tuple[Stored, bytes] | None:
        return await run_in_threadpool(self._get, file_id)

    async def sweep(self) -> int:
        return await run_in_threadpool(self._sweep)

    def _put(self, data: bytes, fmt: str) -> Stored:
        file_id = new_file_id()
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".incoming-")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        path = self.directory / f"{file_id}.{fmt}"
        os.replace(tmp, path)
        return Stored(file_id, fmt, path.stat().st_mtime + self.ttl)

    def _get(self, file_id: str) -> tuple[Stored, bytes] | None:
        if not valid_file_id(file_id):
            return None
        for fmt in MEDIA_TYPES:
            path = self.directory / f"{file_id}.{fmt}"
            try:
                expires = path.stat().st_mtime + self.ttl
                if expires > time.time():
                    return Stored(file_id, fmt, expires), path.read_bytes()
            except FileNotFoundError:
                continue
            path.unlink(missing_ok=True)
        return None

    def _sweep(self) -> int:
        """Delete expired results (and stale partial writes); returns how many."""
        removed, now = 0, time.time()
        for path in self.directory.iterdir():
            try:
                if path.stat().st_mtime + self.ttl <= now:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed
