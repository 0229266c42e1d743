"""How the inference threads are shared by the network calls in flight.

Up to `lanes` calls run at once, on threads // lanes each, whenever more than one
call is wanted: several requests in flight, or one request with tiles ready to
render together (`together`). A call that is wanted alone runs on every thread.

Why narrow calls rather than one wide call at a time: on a 2-core machine two
calls of one thread each gave 10-26% more images per minute than one call of
two threads (bench/RESULTS.md, "Throughput"), and each call stays independent:
a wide call's threads meet at a barrier after every layer, so any other work on
the cores (the service's own tile I/O, the gateway, a neighbour on a shared VPS)
stalls all of them, where it only delays one narrow call (bench/RESULTS.md,
"Mesh overhead"). Backends that cannot change their thread count per call
always take every thread, one call at a time."""

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
        self._wanted = 0  # calls wanted at once: one per request, more while a request renders tiles together
        self._busy = 0  # threads held by calls running now
        self._changed = threading.Condition()
        self._helpers = ThreadPoolExecutor(self.lanes, thread_name_prefix="lane") if self.lanes > 1 else None

    @contextlib.contextmanager
    def _wanting(self, calls: int) -> Iterator[None]:
        with self._changed:
            self._wanted += calls
        try:
            yield
        finally:
            with self._changed:
                self._wanted -= calls
                self._changed.notify_all()

    def request(self) -> contextlib.AbstractContextManager[None]:
        """Held for the life of one request: how many calls are wanted sets the width of each."""
        return self._wanting(1)

    def together(self, renders: Sequence[Callable[[], T]]) -> list[T]:
        """Run one request's `renders` at once, each making its network calls in a lane
        of its own (the first on this thread); their results, in order. Every one has
        ended when this returns, whether or not one failed."""
        if len(renders) == 1 or self._helpers is None:
            return [render() for render in renders]
        with self._wanting(len(renders) - 1):  # the request itself already counts one
            others = [self._helpers.submit(render) for render in renders[1:]]
            try:
                first = renders[0]()
            finally:
                for other in others:
                    other.exception()  # waits; a failure is raised below
            return [first, *(other.result() for other in others)]

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
