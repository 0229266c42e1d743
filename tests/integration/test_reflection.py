"""Server reflection as grpcurl and other generic clients use it: every service
and method resolves to its .proto file, and a call works from reflection alone."""

import json
import subprocess

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from imagemesh.v1 import bgremoval_pb2, effects_pb2, upscaler_pb2

from support.clients import GRPCURL

SERVICES = {
    "upscaler": upscaler_pb2.DESCRIPTOR.services_by_name["Upscaler"],
    "bgremoval": bgremoval_pb2.DESCRIPTOR.services_by_name["BackgroundRemoval"],
    "effects": effects_pb2.DESCRIPTOR.services_by_name["Effects"],
}
# A unary call of each service that needs no input, made by grpcurl from reflection alone.
LIST_CALLS = {"upscaler": "ListModels", "bgremoval": "ListModels", "effects": "ListEffects"}


def file_containing(channel: grpc.Channel, symbol: str) -> list[descriptor_pb2.FileDescriptorProto]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(
        stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)]), timeout=10
        )
    )
    assert not reply.HasField("error_response"), f"{symbol}: {reply.error_response.error_message}"
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_and_method_resolves_through_reflection(mesh, name):
    service = SERVICES[name]
    with grpc.insecure_channel(mesh[name].address) as channel:
        for symbol in [service.full_name] + [method.full_name for method in service.methods]:
            files = file_containing(channel, symbol)
            pool = descriptor_pool.DescriptorPool()
            pending = {f.name: f for f in files}
            while pending:  # add each file after its dependencies, as a client must
                ready = [f for f in pending.values() if all(d not in pending for d in f.dependency)]
                assert ready, f"{symbol}: the files sent do not include all their dependencies"
                for f in ready:
                    pool.Add(f)
                    del pending[f.name]
            resolved = pool.FindServiceByName(service.full_name)
            assert [m.name for m in resolved.methods] == [m.name for m in service.methods]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_grpcurl_describes_and_calls_each_service_from_reflection_alone(mesh, name):
    address, service = mesh[name].address, SERVICES[name].full_name
    described = subprocess.run(
        [GRPCURL, "-plaintext", address, "describe", service], capture_output=True, text=True, timeout=30
    )
    assert described.returncode == 0, described.stderr
    for method in SERVICES[name].methods:
        assert f"rpc {method.name} (" in described.stdout
        one = subprocess.run(
            [GRPCURL, "-plaintext", address, "describe", method.full_name], capture_output=True, text=True, timeout=30
        )
        assert one.returncode == 0 and f"rpc {method.name} (" in one.stdout, one.stderr
    called = subprocess.run(
        [GRPCURL, "-plaintext", "-d", "{}", address, f"{service}/{LIST_CALLS[name]}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout)  # models or effects, as JSON
