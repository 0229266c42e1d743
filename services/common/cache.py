"""A thread-safe LRU cache bounded in bytes, whose entries expire."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Callable

from . import metrics


class ResultCache:
    def __init__(
        self,
        max_bytes: int,
        ttl_seconds: float,
        size_of: Callable[[Any], int],
        clock: Callable[[], float] = time.monotonic,
        service: str = "",
    ):
        self.max_bytes, self.ttl, self.size_of, self.clock = max_bytes, ttl_seconds, size_of, clock
        self._hit = metrics.CACHE_LOOKUPS.labels(service, "hit")
        self._miss = metrics.CACHE_LOOKUPS.labels(service, "miss")
        self._entries: OrderedDict[str, tuple[float, int, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] > self.clock():
                self._entries.move_to_end(key)
                self.hits += 1
                self._hit.inc()
                return entry[2]
            if entry is not None:
                self._drop(key)
            self.misses += 1
            self._miss.inc()
            return None

    def put(self, key: str, value: Any) -> None:
        size = self.size_of(value)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = (self.clock() + self.ttl, size, value)
            self.bytes += size
            now = self.clock()
            for stale in [k for k, (expires, _, _) in self._entries.items() if expires <= now]:
                self._drop(stale)
            while self.bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        _, size, _ = self._entries.pop(key)
        self.bytes -= size
