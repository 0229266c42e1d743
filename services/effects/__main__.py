"""python -m services.effects: the effects gRPC service."""

import asyncio

from imagemesh.v1 import effects_pb2, effects_pb2_grpc

from services.common import logs
from services.common.config import load_or_exit
from services.common.server import ServiceRuntime, serve

from .config import EffectsConfig
from .server import EffectsServicer


async def main() -> None:
    config = load_or_exit(EffectsConfig)
    logs.setup("effects", config.log_level)
    runtime = ServiceRuntime(
        "effects",
        effects_pb2.DESCRIPTOR.services_by_name["Effects"],
        config,
        config.effects_port,
        config.effects_metrics_port,
    )
    servicer = EffectsServicer(runtime)

    async def ready() -> None:  # no models to load
        return None

    await serve(runtime, lambda server: effects_pb2_grpc.add_EffectsServicer_to_server(servicer, server), ready)


if __name__ == "__main__":
    asyncio.run(main())
