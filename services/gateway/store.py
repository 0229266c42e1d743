"""Finished images kept for a while under an unguessable id, in a directory
(a shared volume works: expiry follows the file's age, no other state)."""
from __future__ import annotations

import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from services.common.imageio import MEDIA_TYPES

_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Stored:
    file_id: str
    path: Path
    format: str
    expires_at: float  # epoch seconds

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]


class ResultStore:
    def __init__(self, directory: Path, ttl_seconds: float):
        self.directory, self.ttl = Path(directory), ttl_seconds
        self.directory.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes, fmt: str, file_id: str | None = None) -> Stored:
        file_id = file_id or secrets.token_hex(16)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".incoming-")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        path = self.directory / f"{file_id}.{fmt}"
        os.replace(tmp, path)
        return Stored(file_id, path, fmt, path.stat().st_mtime + self.ttl)

    def get(self, file_id: str) -> Stored | None:
        if not _ID.match(file_id):
            return None
        for fmt in MEDIA_TYPES:
            path = self.directory / f"{file_id}.{fmt}"
            try:
                expires = path.stat().st_mtime + self.ttl
            except FileNotFoundError:
                continue
            if expires > time.time():
                return Stored(file_id, path, fmt, expires)
            path.unlink(missing_ok=True)
        return None

    def sweep(self) -> int:
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
