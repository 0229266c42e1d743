"""The gateway's own memory bound: bytes of decoded pixels it holds at once, the
inputs it is sending and the outputs it assembles. A request takes its share
before decoding or assembling, and gives it back when its answer has ended; past
the limit a request is refused at once (429), a job waits its turn."""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import dataclass

from services.common import metrics

from .errors import HttpError

RETRY_AFTER_SECONDS = 5


@dataclass
class Hold:
    budget: "PixelBudget"
    nbytes: int
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.budget._give_back(self.nbytes)


# The holds of the request being answered: RequestContext gives them back when its answer ends.
request_holds: contextvars.ContextVar[list[Hold] | None] = contextvars.ContextVar("request_holds", default=None)


class PixelBudget:
    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.held = 0
        self._freed = asyncio.Condition()
        self._notifying: set[asyncio.Task] = set()  # referenced until done (the loop keeps tasks weakly)
        metrics.GATEWAY_PIXEL_BYTES.set(0)

    def _fits(self, nbytes: int) -> bool:
        if nbytes > self.limit:
            raise HttpError(
                413,
                "too_large_for_gateway",
                f"this request needs {nbytes} bytes of decoded pixels; "
                f"the gateway holds at most {self.limit} (GATEWAY_MAX_PIXEL_BYTES)",
            )
        return self.held + nbytes <= self.limit

    def _take(self, nbytes: int) -> Hold:
        self.held += nbytes
        metrics.GATEWAY_PIXEL_BYTES.set(self.held)
        return Hold(self, nbytes)

    def take_for_request(self, nbytes: int) -> Hold:
        """For the request being answered, until its answer ends; 429 when there is no room."""
        if not self._fits(nbytes):
            raise HttpError(
                429,
                "busy",
                f"the gateway is holding {self.held} bytes of images; retry later",
                {"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        hold = self._take(nbytes)
        holds = request_holds.get()
        if holds is not None:
            holds.append(hold)
        return hold

    async def wait_for(self, nbytes: int) -> Hold:
        """For a job: waits until there is room (the caller releases the hold)."""
        async with self._freed:
            await self._freed.wait_for(lambda: self._fits(nbytes))
            return self._take(nbytes)

    def _give_back(self, nbytes: int) -> None:
        self.held -= nbytes
        metrics.GATEWAY_PIXEL_BYTES.set(self.held)
        task = asyncio.get_running_loop().create_task(self._notify())
        self._notifying.add(task)
        task.add_done_callback(self._notifying.discard)

    async def _notify(self) -> None:
        async with self._freed:
            self._freed.notify_all()
