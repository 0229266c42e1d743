"""What the metrics say while the mesh works: what autoscalers and dashboards read, and that the
Prometheus rules, the autoscalers and the dashboard use only metrics the live services export."""

import json
import re
import threading
import time

import httpx
import numpy as np
import yaml

from support.images import png
from support.processes import EXACT_UPSCALER, ROOT, free_port, start_gateway, start_service

DEPLOY = ROOT / "deploy"


def gauges(service, names: tuple[str, ...]) -> dict[str, float]:
    """Each named gauge's total, all from one scrape."""
    lines = httpx.get(service.metrics_url, timeout=5).text.splitlines()
    return {name: sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{")) for name in names}


def gauge(service, name: str) -> float:
    return gauges(service, (name,))[name]


def sample_while(work, services: dict, names: tuple[str, ...]) -> list[dict]:
    """Run `work()` in a thread and sample the gauges of every service until it ends."""
    samples, done = [], threading.Event()
    thread = threading.Thread(target=lambda: (work(), done.set()))
    thread.start()
    deadline = time.monotonic() + 300
    while not done.is_set() and time.monotonic() < deadline:
        samples.append(
            {(service, name): value for service in services for name, value in gauges(services[service], names).items()}
        )
        time.sleep(0.02)
    thread.join(10)
    return samples


def test_a_service_that_only_relays_a_pipeline_is_not_in_flight(mesh, http, photo):
    """Keying is quick; the upscale after it takes longer: the background-removal service
    must not count the upscaler's time (while it only relays) as its own."""
    steps = [
        {"op": "remove_background", "model": "keyer"},
        {"op": "upscale", "scale": 4, "model": "realesr-general-x4v3"},
    ]
    replies = []
    samples = sample_while(
        lambda: replies.append(
            http.post(
                "/v1/process",
                files={"file": ("p.png", png(np.tile(photo, (4, 4, 1))))},
                data={"steps": json.dumps(steps), "format": "png"},
            )
        ),
        {"bgremoval": mesh["bgremoval"], "upscaler": mesh["upscaler"]},
        ("imagemesh_grpc_requests_in_flight",),
    )
    assert replies[0].status_code == 200, replies[0].text
    upscaling = [s for s in samples if s[("upscaler", "imagemesh_grpc_requests_in_flight")] > 0]
    assert upscaling, "the upscale was never seen in flight"
    relaying = [s[("bgremoval", "imagemesh_grpc_requests_in_flight")] == 0 for s in upscaling]
    # Both are in flight while the keyer still sends its tiles; once its own part is done, never again.
    assert any(relaying) and all(relaying[relaying.index(True) :])


def test_queued_streams_count_in_the_queue_not_in_flight(tmp_path_factory, model_dir, photo):
    upscaler = start_service("upscaler", tmp_path_factory, model_dir, MAX_CONCURRENT_REQUESTS="1", **EXACT_UPSCALER)
    try:
        ports = {
            "upscaler": int(upscaler.address.rsplit(":", 1)[1]),
            "bgremoval": free_port(),
            "effects": free_port(),
        }  # only the upscaler is called
        gateway = start_gateway(tmp_path_factory, ports, RATE_LIMIT_PER_MINUTE="0")
        data = png(np.tile(photo, (2, 2, 1)))
        replies = []

        def two_at_once():
            threads = [
                threading.Thread(
                    target=lambda: replies.append(
                        httpx.post(
                            f"{gateway.url}/v1/upscale",
                            files={"file": ("p.png", data)},
                            data={"scale": "4", "model": "realesr-general-x4v3", "tile": "64"},
                            timeout=300,
                        )
                    )
                )
                for _ in range(2)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        try:
            samples = sample_while(
                two_at_once, {"upscaler": upscaler}, ("imagemesh_grpc_requests_in_flight", "imagemesh_queue_depth")
            )
        finally:
            gateway.stop()
        assert [r.status_code for r in replies] == [200, 200]
        queued = [s for s in samples if s[("upscaler", "imagemesh_queue_depth")] > 0]
        assert queued, "the second request was never seen waiting"
        for s in samples:  # one slot: at most one stream computes; a waiting one is not also in flight
            assert s[("upscaler", "imagemesh_grpc_requests_in_flight")] + s[("upscaler", "imagemesh_queue_depth")] <= 2
        assert max(s[("upscaler", "imagemesh_queue_depth")] for s in samples) <= 1
    finally:
        upscaler.stop()


def test_series_exist_before_the_first_event_and_buckets_reach_minutes(mesh, gateway):
    for name, service in mesh.items():
        text = httpx.get(service.metrics_url).text
        assert re.search(rf'^imagemesh_requests_rejected_total{{service="{name}"}} ', text, re.M), name
        assert re.search(rf'^imagemesh_queue_depth{{service="{name}"}} ', text, re.M), name
    text = httpx.get(mesh["upscaler"].metrics_url).text
    assert "imagemesh_inference_seconds_bucket{backend=" in text and 'le="300.0"' in text
    assert "imagemesh_grpc_request_duration_seconds_bucket" in text and 'le="900.0"' in text
    cache = httpx.get(mesh["bgremoval"].metrics_url).text
    assert 'imagemesh_cache_lookups_total{result="hit",service="bgremoval"}' in cache


# Series the rules and dashboard read that other exporters provide.
EXTERNAL_METRICS = {"up", "kube_pod_container_status_restarts_total", "kube_deployment_status_replicas_available"}


def exported_names(texts: list[str]) -> set[str]:
    """Every series name the exposition can carry, from its # TYPE lines."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
        "summary": ("_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names = set()
    for text in texts:
        for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
            if kind == "counter":  # some client versions name the family with _total already
                name = name.removesuffix("_total")
            names |= {name + suffix for suffix in suffixes.get(kind, ("",))}
    return names


def used_in(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', "", expr)  # label values are not metric names
    return set(re.findall(r"\b(imagemesh_[a-z_]+|kube_[a-z_]+|up)\b(?!\s*[=!~])", expr))


def test_rules_autoscalers_and_dashboard_use_only_exported_metrics(mesh, gateway):
    live = [httpx.get(service.metrics_url).text for service in mesh.values()]
    live.append(httpx.get(f"{gateway.url}/metrics").text)
    exported = exported_names(live) | EXTERNAL_METRICS
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    expressions = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    adapter = yaml.safe_load((DEPLOY / "prometheus" / "adapter-rules.yaml").read_text())
    expressions += [rule["seriesQuery"] for rule in adapter["rules"]["custom"]]
    dashboard = json.loads((DEPLOY / "grafana" / "imagemesh-dashboard.json").read_text())
    panel_exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    expressions += panel_exprs
    for expr in expressions:
        missing = used_in(expr) - exported
        assert not missing, f"{expr!r} uses {missing}, which no service exports"
        for name in re.findall(r"\b(imagemesh:[a-z0-9_:]+)", expr):
            assert name in recorded, name
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("requests", "error", "duration", "queue depth", "inference", "replicas"):
        assert topic in titles
