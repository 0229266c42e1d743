"""The services of the mesh, in one table: which kind of step each serves, its
gRPC service and streaming method, the setting that says where it is, and its
default ports. Configuration, the stream relay, the mesh client, `make run`,
the tests and the client library all read it from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MeshService:
    name: str  # upscaler: also its module (services.upscaler) and its settings' prefix
    step: str  # the kind of pipeline step it serves (pipeline.proto's Step.op)
    grpc_service: str  # full gRPC service name
    method: str  # its streaming method, which takes a pipeline's steps
    port: int  # default gRPC port
    metrics_port: int  # default Prometheus port
    description: str

    @property
    def address_setting(self) -> str:
        """The attribute of a loaded Config (and, upper-cased, the variable) naming its address."""
        return f"{self.name}_address"

    @property
    def default_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def module(self) -> str:
        return f"services.{self.name}"


SERVICES = (
    MeshService(
        "upscaler", "upscale", "imagemesh.v1.Upscaler", "/imagemesh.v1.Upscaler/Upscale", 50051, 9051, "upscaler"
    ),
    MeshService(
        "bgremoval",
        "remove_background",
        "imagemesh.v1.BackgroundRemoval",
        "/imagemesh.v1.BackgroundRemoval/RemoveBackground",
        50052,
        9052,
        "background-removal",
    ),
    MeshService(
        "effects", "effect", "imagemesh.v1.Effects", "/imagemesh.v1.Effects/ApplyEffects", 50053, 9053, "effects"
    ),
)
BY_NAME = {service.name: service for service in SERVICES}
BY_STEP = {service.step: service for service in SERVICES}
