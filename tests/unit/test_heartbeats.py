"""A sender that is still computing keeps its stream alive with heartbeats."""

import asyncio

from imagemesh.v1 import common_pb2, pipeline_pb2

from services.common import streaming


def test_a_sender_still_computing_sends_heartbeats(monkeypatch):
    """What keeps a pipeline's next service from taking a busy hop for an idle client."""
    monkeypatch.setattr(streaming, "HEARTBEAT_SECONDS", 0.05)
    written = []

    class Call:
        async def write(self, message):
            written.append(message.WhichOneof("part"))

        async def done_writing(self):
            written.append("done")

    async def slow_tiles():
        await asyncio.sleep(0.3)  # computing
        yield pipeline_pb2.StreamRequest(tile=common_pb2.Tile())

    async def run():
        sender = streaming.Sender(Call(), pipeline_pb2.StreamRequest(start=pipeline_pb2.StreamStart()), slow_tiles())
        sender.accepted.set()
        await asyncio.wait_for(sender._task, 5)

    asyncio.run(run())
    assert written[0] == "start" and written[-2:] == ["tile", "done"]
    assert written.count("heartbeat") >= 3
