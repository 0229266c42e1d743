"""How the inference threads are shared by the network calls in flight.

Up to `lanes` calls run at once, on threads // lanes each, whenever more than one
call is wanted: several requests in flight, or one request with several tiles ready
to render (`ReadyTiles`). A call that is wanted alone runs on every thread.

Why narrow calls rather than one wide call at a time: on a 2-core machine two
calls of one thread each gave 10-26% more images per minute than one call of
two threads (bench/RESULTS.md, "Throughput"), and each call stays independent:
a wide call's threads meet at a barrier after every layer, so any other work on
the cores (the service's own tile I/O, the gateway, a neighbour on a shared VPS)
stalls all of them, where it only delays one narrow call (bench/RESULTS.md,
"Mesh overhead"). For the same reason a request's tiles never wait for each other:
each lane takes the request's next tile as soon as its own is done, so work that
delays one lane never leaves another idle. Backends that cannot change their
thread count per call always take every thread, one call at a time."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")


class InferenceLanes:
    def __init__(self, threads: int, lanes: int = 1):
        self.threads = max(1, threads)
        self.lanes = max(1, min(lanes, self.threads))
        self._wanted = 0  # calls wanted at once: one per request, more while a request has several tiles ready
        self._busy = 0  # threads held by calls running now
        self._changed = threading.Condition()
        self._helpers = ThreadPoolExecutor(self.lanes, thread_name_prefix="lane") if self.lanes > 1 else None

    def _add_wanted(self, calls: int) -> None:
        with self._changed:
            self._wanted += calls
            self._changed.notify_all()

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Held for the life of one request: how many calls are wanted sets the width of each."""
        self._add_wanted(1)
        try:
            yield
        finally:
            self._add_wanted(-1)

    def each(self, render: Callable[[T], None], jobs: Sequence[T], at_once: int) -> None:
        """`render` every one of a request's `jobs`, up to `at_once` at a time (the first lane on
        this thread), each lane taking the next job as soon as its own is done. Every lane has
        ended when this returns; the first failure is raised then, and no job starts after it."""
        at_once = min(at_once, self.lanes, len(jobs))
        if at_once <= 1 or self._helpers is None:
            for job in jobs:
                render(job)
            return
        ready = ReadyTiles(self)
        taken, left = 0, len(jobs)
        ready.set(left)
        taking = threading.Lock()
        failed = threading.Event()

        def lane() -> None:
            nonlocal taken, left
            while not failed.is_set():
                with taking:
                    if taken == len(jobs):
                        return
                    job, taken = jobs[taken], taken + 1
                try:
                    render(job)
                except BaseException:
                    failed.set()
                    raise
                finally:
                    with taking:
                        left -= 1
                        ready.set(left)

        try:
            others = [self._helpers.submit(lane) for _ in range(at_once - 1)]
            try:
                lane()
            finally:
                for other in others:
                    other.exception()  # waits; a failure is raised below
            for other in others:
                other.result()
        finally:
            ready.set(0)

    def _width(self, adapts: bool) -> int:
        if not adapts or self._wanted <= 1:
            return self.threads
        return self.threads // min(self.lanes, self._wanted)

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


class ReadyTiles:
    """One request's tiles ready to render or rendering: up to the lanes, each beyond the
    first is one more call wanted at once (the request itself counts one), which narrows
    every call. Told before any of them starts, so that the first does not take every
    thread; set back to 0 when the request's rendering ends."""

    def __init__(self, lanes: InferenceLanes):
        self._lanes = lanes
        self._extra = 0

    def set(self, tiles: int) -> None:
        extra = max(0, min(tiles, self._lanes.lanes) - 1)
        if extra != self._extra:
            self._lanes._add_wanted(extra - self._extra)
            self._extra = extra
