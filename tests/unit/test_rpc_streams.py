"""Calls that end from outside their own task: a response stream the event loop closes
when gRPC abandoned it at a reply it was waiting to send, and a request stream that a
client's cancellation ended before gRPC cancelled the handler."""

import asyncio
import contextvars

import grpc
import pytest
from imagemesh.v1 import effects_pb2

from services.common import metrics
from services.common.errors import StreamEndedEarly
from services.common.server import ServiceRuntime, rpc
from services.common.streaming import Sender
from services.effects.config import EffectsConfig


class Context:
    """The parts of grpc.aio.ServicerContext that the runtime uses."""

    def invocation_metadata(self):
        return ()

    async def send_initial_metadata(self, metadata):
        pass

    def set_trailing_metadata(self, metadata):
        pass

    async def abort(self, code, details):
        self.aborted = code
        raise grpc.aio.AbortError(details)


def counted(method: str, code: str = "CANCELLED") -> float:
    return metrics.REQUESTS.labels("test", method, code)._value.get()


def runtime() -> ServiceRuntime:
    return ServiceRuntime("test", effects_pb2.DESCRIPTOR.services_by_name["Effects"], EffectsConfig(), 0, 0)


def test_a_stream_closed_by_the_loops_finaliser_is_counted_cancelled_and_closes_the_servicers_stream():
    closed = []

    class Servicer:
        def __init__(self, runtime):
            self.runtime = runtime

        @rpc()
        async def Replies(self, request, context):
            try:
                for index in range(10):
                    yield index
            finally:
                closed.append(True)

    async def scenario():
        before = counted("Replies")
        stream = Servicer(runtime()).Replies(None, Context())
        assert await anext(stream) == 0
        # The finaliser closes an abandoned generator in a task of its own, in another context.
        await asyncio.create_task(stream.aclose(), context=contextvars.Context())
        assert counted("Replies") == before + 1
        assert closed == [True]  # at once, not whenever the finaliser gets to it

    asyncio.run(scenario())


class EndsEarly:
    """A servicer whose request stream ends with tiles missing."""

    def __init__(self):
        self.runtime = runtime()
        self.ended = asyncio.Event()

    @rpc()
    async def Truncated(self, request, context):
        self.ended.set()
        raise StreamEndedEarly("the stream ended with 3 input tiles missing")


def test_a_request_stream_ended_by_a_cancellation_that_comes_after_it_is_counted_cancelled_not_refused():
    async def scenario():
        servicer, context = EndsEarly(), Context()
        before = (counted("Truncated"), counted("Truncated", "INVALID_ARGUMENT"))
        call = asyncio.create_task(servicer.Truncated(None, context))
        await servicer.ended.wait()
        call.cancel()  # as gRPC cancels the handler once the client's cancellation reaches it
        with pytest.raises(asyncio.CancelledError):
            await call
        assert not hasattr(context, "aborted")
        assert (counted("Truncated"), counted("Truncated", "INVALID_ARGUMENT")) == (before[0] + 1, before[1])

    asyncio.run(scenario())


def test_a_request_stream_that_ends_early_with_no_cancellation_is_refused_as_invalid():
    async def scenario():
        servicer, context = EndsEarly(), Context()
        before = counted("Truncated", "INVALID_ARGUMENT")
        with pytest.raises(grpc.aio.AbortError):
            await servicer.Truncated(None, context)
        assert context.aborted == grpc.StatusCode.INVALID_ARGUMENT
        assert counted("Truncated", "INVALID_ARGUMENT") == before + 1

    asyncio.run(scenario())


def test_requests_that_cannot_be_written_cancel_their_call_instead_of_leaving_it_waiting():
    class Call:
        """The request side of a grpc.aio stream-stream call."""

        def __init__(self):
            self.written, self.half_closed, self.cancelled = [], False, False

        async def write(self, message):
            self.written.append(message)

        async def done_writing(self):
            self.half_closed = True

        def cancel(self):
            self.cancelled = True

    def tiles():
        yield "tile 1"
        raise ValueError("a tile that cannot be made")

    async def scenario():
        call = Call()
        sender = Sender(call, "start", tiles())
        sender.accepted.set()
        await asyncio.wait_for(sender._task, 5)
        assert call.written == ["start", "tile 1"] and call.cancelled
        assert not call.half_closed  # a stream whose requests failed is not ended as if complete

    asyncio.run(scenario())
