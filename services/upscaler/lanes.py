"""How the inference threads are shared by the requests in flight.

A lone request runs its network calls one at a time on every thread: the fastest
single request. With two requests or more in flight, up to `lanes` calls run at
once on threads // lanes each: on a 2-core machine two calls of one thread each
gave 10-26% more images per minute than one call of two threads at a time, but
made a lone request 1.5-1.8x slower (bench/RESULTS.md, "Throughput"), so the
width is chosen per call from the requests in flight. Backends that cannot change
their thread count per call (torch: one intra-op pool per process) always take
every thread, one call at a time."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator


class InferenceLanes:
    def __init__(self, threads: int, lanes: int = 1):
        self.threads = max(1, threads)
        self.lanes = max(1, min(lanes, self.threads))
        self._requests = 0
        self._busy = 0  # threads held by calls running now
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Held for the life of one request: how many are in flight sets the width of each call."""
        with self._changed:
            self._requests += 1
        try:
            yield
        finally:
            with self._changed:
                self._requests -= 1
                self._changed.notify_all()

    def _width(self, adapts: bool) -> int:
        if not adapts or self._requests <= 1:
            return self.threads
        return self.threads // min(self.lanes, self._requests)

    @contextlib.contextmanager
    def call(self, adapts: bool = True) -> Iterator[int]:
        """Held around one network call; gives the number of threads it may use."""
        with self._changed:
            while self._busy + (width := self._width(adapts)) > self.threads:
                self._changed.wait()
            self._busy += width
        try:
            yield width
        finally:
            with self._changed:
                self._busy -= width
                self._changed.notify_all()
