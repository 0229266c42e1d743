"""python -m services.effects: the effects gRPC service."""
import asyncio

from imagemesh.v1 import effects_pb2, effects_pb2_grpc

from services.common import config as cfg
from services.common import logs
from services.common.server import ServiceRuntime, serve

from .server import EffectsServicer

SETTINGS = cfg.SERVICE_SETTINGS + cfg.port_settings("effects") + [
    cfg.Setting("EFFECTS_TILE_SIZE", int, 256, "tile edge for tileable effects", minimum=16, maximum=4096),
]


async def main() -> None:
    config = cfg.load_or_exit(SETTINGS)
    logs.setup("effects", config.log_level)
    runtime = ServiceRuntime("effects", effects_pb2.DESCRIPTOR.services_by_name["Effects"], config,
                             config.effects_port, config.effects_metrics_port)
    servicer = EffectsServicer(runtime)

    async def ready() -> None:  # no models to load
        return None

    await serve(runtime, lambda server: effects_pb2_grpc.add_EffectsServicer_to_server(servicer, server), ready)


if __name__ == "__main__":
    asyncio.run(main())
