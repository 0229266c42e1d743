"""Gateway replicas sharing a real Redis, behind real Envoy: any replica answers any
request, a job outlives the replica that ran it, the rate limit is one for all."""

import base64
import io
import json
import os
import signal
import time

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from support.clients import events
from support.envoy import EnvoyMesh
from support.images import png
from support.processes import free_ports, mesh_addresses, start_gateway, start_service

CLAIM_SECONDS = "2"
# Long enough (about 8 s here) to be caught running; killed at its start, it never has to finish fast.
SLOW_STEPS = json.dumps([{"op": "upscale", "scale": 4, "model": "realesr-general-x4v3", "tile": 64}])
SLOW_IMAGE_TILES = (4, 4, 1)


def replica(tmp_path_factory, mesh_ports, redis_url, **env):
    env = {
        "REDIS_URL": redis_url,
        "JOB_CLAIM_SECONDS": CLAIM_SECONDS,
        "MAX_CONCURRENT_JOBS": "1",
        "TRUSTED_PROXIES": "127.0.0.1",
        "RATE_LIMIT_PER_MINUTE": "0",
        **env,
    }  # polls are many
    return start_gateway(tmp_path_factory, mesh_ports, **env)


def holder_pid(redis_url: str, other_than: int | None = None) -> int:
    """The process of the replica whose worker holds the job's queue entry (consumers
    are named host-pid-nonce-worker), once it is not `other_than`."""
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            pending = client.xpending_range("imagemesh:jobs", "gateways", "-", "+", 10)
            if pending:
                pid = int(pending[0]["consumer"].decode().rsplit("-", 3)[1])
                if pid != other_than:
                    return pid
            time.sleep(0.1)
    finally:
        client.close()
    raise AssertionError("no replica took the job")


def wait_for(client: httpx.Client, job_id: str, statuses: tuple[str, ...], seconds: float) -> dict:
    """Poll until the job reaches one of `statuses`; every poll must find it (no 404, no 5xx)."""
    deadline = time.monotonic() + seconds
    while True:
        reply = client.get(f"/v1/jobs/{job_id}")
        assert reply.status_code == 200, reply.text
        job = reply.json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def kill(service) -> None:
    os.kill(service.process.pid, signal.SIGKILL)
    service.process.wait(10)


@pytest.fixture
def replicas(tmp_path_factory, mesh, mesh_ports, redis_url):
    gateways = [replica(tmp_path_factory, mesh_ports, redis_url) for _ in range(2)]
    front = EnvoyMesh(tmp_path_factory, mesh_ports, gateways=gateways)
    yield front
    front.stop()
    for gateway in gateways:
        gateway.stop()


def test_a_job_is_polled_through_envoy_whichever_replica_answers(replicas, photo):
    with httpx.Client(base_url=replicas.url, timeout=120) as client:
        steps = [{"op": "upscale", "scale": 2, "model": "lanczos", "tile": 32}, {"op": "effect", "effect": "sepia"}]
        submitted = client.post(
            "/v1/jobs", files={"file": ("p.png", png(np.tile(photo, (2, 2, 1))))}, data={"steps": json.dumps(steps)}
        )
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        done = wait_for(client, job_id, ("done",), 120)
        assert done["progress"]["tiles_done"] == done["progress"]["tiles_total"] > 1
        for gateway in replicas.gateways:  # each replica reads the same job, events and result
            with httpx.Client(base_url=gateway.url, timeout=60) as direct:
                assert direct.get(f"/v1/jobs/{job_id}").json()["status"] == "done"
                assert events(direct, job_id)[-1][0] == "done"
                result = direct.get(f"/v1/jobs/{job_id}/result")
                assert result.status_code == 200
                assert Image.open(io.BytesIO(result.content)).size == (512, 384)


def test_progress_events_come_from_another_replica_than_the_one_running_the_job(replicas, photo):
    first, second = replicas.gateways
    with httpx.Client(base_url=first.url, timeout=120) as a, httpx.Client(base_url=second.url, timeout=120) as b:
        job = a.post(
            "/v1/jobs",
            files={"file": ("p.png", png(np.tile(photo, (2, 2, 1))))},
            data={"steps": json.dumps([{"op": "upscale", "scale": 2, "model": "lanczos", "tile": 16}])},
        ).json()
        stream = events(b, job["id"])
        assert stream[-1][0] == "done"
        done = [view["progress"]["tiles_done"] for _, view in stream]
        assert done == sorted(done) and done[-1] == stream[-1][1]["progress"]["tiles_total"]


def test_a_stored_download_link_works_on_every_replica(replicas, photo):
    first, second = replicas.gateways
    body = {"image": base64.b64encode(png(photo)).decode(), "scale": 2, "model": "lanczos", "output_ext": "png"}
    made = httpx.post(f"{first.url}/upscale", json=body, timeout=60)
    assert made.status_code == 200, made.text
    link = made.json()["download_url"].replace(first.url, second.url)
    fetched = httpx.get(link, timeout=30)
    assert fetched.status_code == 200 and Image.open(io.BytesIO(fetched.content)).size == (256, 192)


def test_the_rate_limit_is_one_bucket_for_all_replicas(tmp_path_factory, mesh, mesh_ports, redis_url):
    gateways = [
        replica(tmp_path_factory, mesh_ports, redis_url, RATE_LIMIT_PER_MINUTE="1", RATE_LIMIT_BURST="3")
        for _ in range(2)
    ]
    try:
        unknown = "/v1/jobs/" + "0" * 32
        codes = [httpx.get(gateways[n % 2].url + unknown, timeout=10).status_code for n in range(5)]
        assert codes == [404, 404, 404, 429, 429]
    finally:
        for gateway in gateways:
            gateway.stop()


def test_a_job_whose_replica_is_killed_completes_on_another(replicas, redis_url, photo):
    with httpx.Client(base_url=replicas.url, timeout=120) as client:
        job = client.post(
            "/v1/jobs", files={"file": ("p.png", png(np.tile(photo, SLOW_IMAGE_TILES)))}, data={"steps": SLOW_STEPS}
        ).json()
        pid = holder_pid(redis_url)
        wait_for(client, job["id"], ("running",), 60)
        kill(next(g for g in replicas.gateways if g.process.pid == pid))
        done = wait_for(client, job["id"], ("done", "failed"), 300)  # every poll through Envoy answered
        assert done["status"] == "done" and done["attempts"] == 2, done
        result = client.get(f"/v1/jobs/{job['id']}/result")
        assert Image.open(io.BytesIO(result.content)).size == (2048, 1536)


def test_a_job_whose_replicas_keep_dying_fails_with_a_reason(tmp_path_factory, mesh, mesh_ports, redis_url, photo):
    started = [replica(tmp_path_factory, mesh_ports, redis_url)]
    try:
        job = httpx.post(
            f"{started[0].url}/v1/jobs",
            files={"file": ("p.png", png(np.tile(photo, SLOW_IMAGE_TILES)))},
            data={"steps": SLOW_STEPS},
            timeout=60,
        ).json()
        for attempt in (1, 2):  # the replica running it dies on its first run, and again on its second
            holder = started[-1]
            assert (
                holder_pid(redis_url, other_than=started[-2].process.pid if attempt > 1 else None) == holder.process.pid
            )
            with httpx.Client(base_url=holder.url, timeout=30) as client:
                deadline = time.monotonic() + 60
                while wait_for(client, job["id"], ("running",), 60)["attempts"] != attempt:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            kill(holder)
            started.append(replica(tmp_path_factory, mesh_ports, redis_url))
        with httpx.Client(base_url=started[-1].url, timeout=30) as client:
            failed = wait_for(client, job["id"], ("failed", "done"), 60)
        assert failed["status"] == "failed" and failed["error"]["code"] == "gateway_lost", failed
        assert "stopped 2 times" in failed["error"]["message"]
    finally:
        for gateway in started:
            gateway.stop()


def test_picks_recorded_through_one_bgremoval_replica_count_in_another(
    tmp_path_factory, model_dir, postgres_url, portrait
):
    """Two bgremoval replicas on one PostgreSQL, each behind its own gateway."""
    started = []
    try:
        gateways = []
        for _ in range(2):
            ports = dict(zip(("upscaler", "bgremoval", "effects"), free_ports(3)))
            started.append(
                start_service(
                    "bgremoval",
                    tmp_path_factory,
                    model_dir,
                    ports["bgremoval"],
                    mesh_addresses(ports),
                    DATABASE_URL=postgres_url,
                )
            )
            gateways.append(start_gateway(tmp_path_factory, ports))
            started.append(gateways[-1])
        first, second = (httpx.Client(base_url=g.url, timeout=60) for g in gateways)
        with first, second:
            made = first.post(
                "/v1/remove-background",
                files={"file": ("p.png", png(portrait))},
                data={"models": "keyer,mediapipe-selfie"},
            )
            assert made.status_code == 200, made.text
            request_id = made.json()["request_id"]
            wrong = second.post("/v1/remove-background/choice", json={"request_id": request_id, "model": "u2net"})
            assert (
                wrong.status_code == 400 and "candidates: keyer, mediapipe-selfie" in wrong.json()["error"]["message"]
            )
            picked = second.post("/v1/remove-background/choice", json={"request_id": request_id, "model": "keyer"})
            assert picked.status_code == 200, picked.text
            for client in (first, second):
                stats = client.get("/v1/remove-background/stats").json()
                by_model = {m["model"]: m for m in stats["models"]}
                assert stats["choices"] == 1 and stats["requests"] == 1
                assert by_model["keyer"]["picks"] == 1 and by_model["mediapipe-selfie"]["offered"] == 1
    finally:
        for service in started:
            service.stop()


def test_consumers_of_stopped_replicas_are_forgotten_unless_they_hold_work(redis_url, monkeypatch):
    import asyncio

    from services.gateway import state

    monkeypatch.setattr(state, "STALE_CONSUMER_SECONDS", 0)

    async def scenario() -> set[str]:
        shared = state.RedisState(redis_url, 60, 0, 1, 30)
        try:
            await shared.sweep()  # makes the group
            await shared.redis.xadd(shared.QUEUE, {"job": "x"})
            await shared.redis.xreadgroup(shared.GROUP, "holder", {shared.QUEUE: ">"}, count=1)
            await shared.redis.xreadgroup(shared.GROUP, "idle", {shared.QUEUE: ">"}, count=1)
            await asyncio.sleep(0.01)
            await shared.sweep()
            return {c["name"].decode() for c in await shared.redis.xinfo_consumers(shared.QUEUE, shared.GROUP)}
        finally:
            await shared.close()

    assert asyncio.run(scenario()) == {"holder"}
