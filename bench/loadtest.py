"""`make loadtest`: the mesh under load, on loopback, bounded in time and count.

Starts its own mesh (the three services and the gateway), measures how many
requests a second it sustains, then sends an open-loop load at 80% of that,
at twice that, and at 80% again (recovery). Reports throughput, latency
percentiles, answers by status and each service's peak memory.

    .venv/bin/python -m bench.loadtest [--models DIR] [--seconds 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import skimage.data
import yaml
from PIL import Image

from bench.run import DEFAULT_MODELS, ROOT, Process, free_port


# A mix of what users send: upscales, background removal, effects, pipelines.
def workload(image: bytes) -> list[tuple[str, dict]]:
    return [
        ("/v1/upscale", {"scale": "2", "model": "realesr-general-x4v3"}),
        ("/v1/upscale", {"scale": "4", "model": "lanczos"}),
        ("/v1/remove-background", {"model": "mediapipe-selfie"}),
        ("/v1/effects", {"effect": "blackwhite"}),
        (
            "/v1/process",
            {
                "steps": '[{"op": "remove_background", "model": "keyer"}, '
                '{"op": "upscale", "scale": 2, "model": "lanczos"}]'
            },
        ),
    ]


def memory_limits() -> dict[str, str]:
    """The Kubernetes memory limits (CPU overlay): what each service must stay under."""
    limits = {}
    for path in list((ROOT / "deploy/k8s/base").glob("*.yaml")) + list(
        (ROOT / "deploy/k8s/overlays/cpu").glob("*.yaml")
    ):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Deployment":
                limits[doc["metadata"]["name"]] = doc["spec"]["template"]["spec"]["containers"][0]["resources"][
                    "limits"
                ]["memory"]
    return limits


def mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


class Mesh:
    def __init__(self, models: Path):
        ports = {name: free_port() for name in ("upscaler", "bgremoval", "effects")}
        addresses = {f"{n.upper()}_ADDRESS": f"127.0.0.1:{p}" for n, p in ports.items()}
        common = {
            "MODEL_DIR": str(models),
            "LOG_LEVEL": "WARNING",
            "MAX_CONCURRENT_REQUESTS": "2",
            "MAX_QUEUED_REQUESTS": "4",
            **addresses,
        }
        self.services = {
            name: Process(
                f"services.{name}", {**common, f"{name.upper()}_PORT": str(port), f"{name.upper()}_METRICS_PORT": "0"}
            )
            for name, port in ports.items()
        }
        gateway_port = free_port()
        self.services["gateway"] = Process(
            "services.gateway",
            {
                **common,
                "GATEWAY_PORT": str(gateway_port),
                "RATE_LIMIT_PER_MINUTE": "0",
                "RESULT_DIR": str(Path(os.environ.get("TMPDIR", "/tmp")) / f"loadtest-{gateway_port}"),
            },
        )
        self.url = f"http://127.0.0.1:{gateway_port}"

    async def ready(self) -> None:
        async with httpx.AsyncClient() as client:
            for _ in range(1200):
                try:
                    if (await client.get(f"{self.url}/readyz", timeout=2)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.25)
        raise SystemExit("the mesh did not become ready")

    def peak_mib(self) -> dict[str, float]:
        return {name: process.peak_rss_mib() for name, process in self.services.items()}

    def stop(self) -> None:
        for process in self.services.values():
            process.stop()


async def one(client: httpx.AsyncClient, url: str, image: bytes, route: str, fields: dict, results: list) -> None:
    started = time.perf_counter()
    try:
        reply = await client.post(url + route, files={"file": ("photo.png", image)}, data=fields)
        status = reply.status_code
        retry_after = reply.headers.get("retry-after") if status in (429, 503) else "n/a"
    except httpx.HTTPError as exc:
        status, retry_after = type(exc).__name__, None
    results.append((status, time.perf_counter() - started, retry_after))


async def closed_loop(url: str, image: bytes, seconds: float, concurrency: int) -> float:
    """Requests a second the mesh completes when kept busy: its sustainable rate."""
    mix, results, stop = workload(image), [], time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=120) as client:

        async def worker():
            while time.monotonic() < stop:
                await one(client, url, image, *random.choice(mix), results)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sum(1 for status, _, _ in results if status == 200) / seconds


async def open_loop(url: str, image: bytes, rate: float, seconds: float) -> dict:
    """Send at `rate` requests a second whatever the answers (bounded: rate * seconds requests)."""
    mix, results, tasks = workload(image), [], []
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200)) as client:
        for n in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(client, url, image, *random.choice(mix), results)))
        await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    latencies = sorted(seconds for status, seconds, _ in results if status == 200)
    statuses = Counter(str(status) for status, _, _ in results)
    return {
        "rate": rate,
        "sent": len(results),
        "ok_per_s": len(latencies) / elapsed,
        "statuses": dict(statuses),
        "p50": np.percentile(latencies, 50) if latencies else float("nan"),
        "p95": np.percentile(latencies, 95) if latencies else float("nan"),
        "p99": np.percentile(latencies, 99) if latencies else float("nan"),
        "refusals_without_retry_after": sum(1 for status, _, after in results if status in (429, 503) and not after),
    }


async def run(models: Path, seconds: float) -> str:
    random.seed(1)
    photo = io.BytesIO()
    Image.fromarray(np.asarray(Image.fromarray(skimage.data.astronaut()).resize((192, 192)))).save(photo, "PNG")
    image = photo.getvalue()
    mesh = Mesh(models)
    try:
        await mesh.ready()
        await closed_loop(mesh.url, image, 3, 2)  # warm up
        capacity = await closed_loop(mesh.url, image, seconds / 2, 4)
        sustainable = max(0.5, 0.8 * capacity)
        phases = [
            ("steady (80% of capacity)", sustainable),
            ("twice that", 2 * sustainable),
            ("steady again (recovery)", sustainable),
        ]
        rows = [(name, await open_loop(mesh.url, image, rate, seconds)) for name, rate in phases]
        peaks, limits = mesh.peak_mib(), memory_limits()
    finally:
        mesh.stop()
    lines = [
        "# Load test\n",
        f"Command: `make loadtest` ({seconds:g} s a phase); the mix: upscale 2x "
        "(realesr-general-x4v3), upscale 4x (lanczos), background removal (mediapipe-selfie), film black and "
        "white, and a remove-background + upscale pipeline, on a 192x192 photo; each service runs 2 requests "
        "at once and queues 4.\n",
        f"Capacity measured closed-loop: {capacity:.2f} requests/s.\n",
        "| phase | sent at | sent | answered 200 per s | p50 | p95 | p99 | answers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
        lines.append(
            f"| {name} | {r['rate']:.2f}/s | {r['sent']} | {r['ok_per_s']:.2f} | {r['p50']:.2f} s | "
            f"{r['p95']:.2f} s | {r['p99']:.2f} s | {answers} |"
        )
    bad = [s for _, r in rows for s in r["statuses"] if s not in ("200", "429", "503")]
    missing_retry = sum(r["refusals_without_retry_after"] for _, r in rows)
    lines += [
        "",
        f"Answers other than 200, 429 and 503: {', '.join(bad) or 'none'}; refusals without Retry-After: "
        f"{missing_retry}.\n",
        "| service | peak memory | Kubernetes limit |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {peak:.0f} MiB | {limits.get(name, 'n/a')} |" for name, peak in peaks.items()]
    over = [name for name, peak in peaks.items() if name in limits and peak > mib(limits[name])]
    lines.append(f"\nOver its limit: {', '.join(over) or 'none'}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "LOADTEST.md")
    args = parser.parse_args(argv)
    text = asyncio.run(run(args.models.resolve(), args.seconds))
    print(text)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
