"""A response stream closed from outside its own task, as the event loop closes one that
gRPC abandoned at a reply it was waiting to send."""

import asyncio
import contextvars

from imagemesh.v1 import effects_pb2

from services.common import metrics
from services.common.server import ServiceRuntime, rpc
from services.effects.config import EffectsConfig


class Context:
    """The parts of grpc.aio.ServicerContext that the runtime uses."""

    def invocation_metadata(self):
        return ()

    async def send_initial_metadata(self, metadata):
        pass


def cancelled_count(method: str) -> float:
    return metrics.REQUESTS.labels("test", method, "CANCELLED")._value.get()


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
        config = EffectsConfig()
        runtime = ServiceRuntime("test", effects_pb2.DESCRIPTOR.services_by_name["Effects"], config, 0, 0)
        before = cancelled_count("Replies")
        stream = Servicer(runtime).Replies(None, Context())
        assert await anext(stream) == 0
        # The finaliser closes an abandoned generator in a task of its own, in another context.
        await asyncio.create_task(stream.aclose(), context=contextvars.Context())
        assert cancelled_count("Replies") == before + 1
        assert closed == [True]  # at once, not whenever the finaliser gets to it

    asyncio.run(scenario())
