"""StreamLimiter's compute slots: a stream's computations share its slot, other streams
wait for one of their own, the earliest-admitted first."""

import asyncio
import threading

from services.common.server import StreamLimiter


def test_a_streams_computations_run_at_once_in_its_one_slot_while_another_stream_waits():
    limiter = StreamLimiter("limiter-test", max_active=1, max_queued=4, computations_per_stream=2)
    both_running = threading.Barrier(2, timeout=30)  # a bound, so that a failure fails rather than hangs
    events: list[str] = []

    def rendezvous(name: str) -> None:
        events.append(f"{name} started")
        both_running.wait()  # only passes if the two run at once
        events.append(f"{name} ended")

    async def main() -> None:
        first, second = limiter.admit("Test"), limiter.admit("Test")
        two_at_once = asyncio.gather(first.compute(rendezvous, "a"), first.compute(rendezvous, "b"))
        await asyncio.sleep(0)  # the first stream takes the one slot
        await asyncio.gather(two_at_once, second.compute(events.append, "second stream"))
        first.finish()
        second.finish()

    asyncio.run(main())
    assert events.index("second stream") > max(events.index("a ended"), events.index("b ended"))
    assert limiter._free == 1 and not limiter._waiting  # the slot was given back


def test_a_slot_taken_for_a_stream_is_given_back_once_its_last_computation_ends():
    limiter = StreamLimiter("limiter-test", max_active=1, max_queued=4, computations_per_stream=2)

    async def main() -> None:
        stream = limiter.admit("Test")
        await stream.compute(sum, [1, 2])
        assert limiter._free == 1
        await asyncio.gather(stream.compute(sum, [1]), stream.compute(sum, [2]))
        stream.finish()

    asyncio.run(main())
    assert limiter._free == 1 and limiter.open == 0
