"""python -m services.run: the whole mesh in the foreground on loopback.

Fetches the small default models MODEL_DIR lacks (FETCH_MODELS=0: never; offline,
one line says what could not be fetched), then starts every service, the gateway
and Envoy in front of them (the port users call: REST, the web page, gRPC and
gRPC-Web) as child processes. Ctrl-C or SIGTERM
drains and stops them all; one that dies is restarted with backoff (one that
cannot start for its configuration stops the mesh). Children get SIGKILL from
the kernel if this process is killed outright, so nothing is left orphaned."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from services.common.topology import SERVICES
from services.envoy import LocalTls, local_config
from services.fetch_models import fetch_missing_at_start

# Replica i of a service listens on the first replica's ports + i * REPLICA_PORT_STEP.
REPLICA_PORT_STEP = 10
STOP_GRACE_SECONDS = 35
PR_SET_PDEATHSIG = 1
CONFIG_ERROR = 2  # a service's exit code for a bad setting: restarting would not help
MAX_BACKOFF_SECONDS, STEADY_SECONDS = 30.0, 60.0
# State of a mesh started here, kept in the checkout so that two meshes on one
# machine never share a database or a result folder (each path can be set).
STATE_DIR = Path(__file__).resolve().parent.parent / "var"
STATE_DEFAULTS = {
    "RESULT_DIR": STATE_DIR / "results",
    "BGREMOVAL_DB": STATE_DIR / "bgremoval.sqlite3",
    "ONNX_CACHE_DIR": STATE_DIR / "cache" / "onnx",
}


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def say(message: str) -> None:
    print(f"imagemesh: {message}", file=sys.stderr, flush=True)


class Child:
    """One process of the mesh, restarted with backoff when it dies (as Kubernetes
    restarts a pod): 1 s, 2 s, 4 s ... at most MAX_BACKOFF_SECONDS, back to 1 s once
    it has run for STEADY_SECONDS."""

    def __init__(self, label: str, argv: list[str], env: dict):
        self.label, self.argv, self.env = label, argv, env
        self.restarts = 0
        self.backoff = 1.0
        self.restart_at: float | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, env=self.env, preexec_fn=_die_with_parent)
        self.started = time.monotonic()
        self.restart_at = None

    def schedule_restart(self) -> None:
        if time.monotonic() - self.started >= STEADY_SECONDS:
            self.backoff = 1.0
        say(f"{self.label} exited with {self.process.returncode}; restarting in {self.backoff:g} s")
        self.restart_at = time.monotonic() + self.backoff
        self.restarts += 1
        self.backoff = min(MAX_BACKOFF_SECONDS, self.backoff * 2)


def main() -> int:
    env = dict(os.environ)
    env.setdefault("MODEL_DIR", "./models")
    if env.get("FETCH_MODELS", "1") != "0":
        problem = fetch_missing_at_start(Path(env["MODEL_DIR"]), env.get("MODEL_MIRROR") or None)
        if problem:
            say(problem)
    for name, path in STATE_DEFAULTS.items():
        env.setdefault(name, str(path))
    children = []
    endpoints: dict[str, list[int]] = {}  # Envoy's clusters
    for service in SERVICES:  # in the table's order; the gateway last
        name, upper = service.name, service.name.upper()
        port = int(env.get(f"{upper}_PORT", service.port))
        metrics_port = int(env.get(f"{upper}_METRICS_PORT", service.metrics_port))
        replicas = int(env.get(f"{upper}_REPLICAS", "1"))
        endpoints[name] = [port + i * REPLICA_PORT_STEP for i in range(replicas)]
        env.setdefault(f"{upper}_ADDRESS", ",".join(f"127.0.0.1:{p}" for p in endpoints[name]))
        for i, replica_port in enumerate(endpoints[name]):
            own = {
                f"{upper}_PORT": str(replica_port),
                f"{upper}_METRICS_PORT": str(metrics_port and metrics_port + i * REPLICA_PORT_STEP),
            }
            children.append(Child(f"{name} :{replica_port}", [sys.executable, "-m", service.module], {**env, **own}))
    env.setdefault("GATEWAY_PORT", "8081")
    env.setdefault("TRUSTED_PROXIES", "127.0.0.1")  # Envoy, below, names the client in X-Forwarded-For
    endpoints["gateway"] = [int(env["GATEWAY_PORT"])]
    children.append(Child("gateway", [sys.executable, "-m", "services.gateway"], env))
    port = int(env.get("ENVOY_PORT", "8080"))
    config = Path(tempfile.mkdtemp(prefix="imagemesh-envoy-")) / "envoy.yaml"  # removed when the mesh stops
    origins = [o.strip() for o in env.get("CORS_ORIGINS", "").split(",") if o.strip()]
    tls = None
    if env.get("TLS_CERT_FILE") and env.get("TLS_KEY_FILE"):  # HTTPS beside HTTP
        tls = LocalTls(
            int(env.get("ENVOY_TLS_PORT", "8443")),
            Path(env["TLS_CERT_FILE"]),
            Path(env["TLS_KEY_FILE"]),
            config.with_name("tls-sds.yaml"),
        )
        tls.write_secret()
    config.write_text(
        yaml.safe_dump(local_config(endpoints, port, int(env.get("ENVOY_ADMIN_PORT", "9901")), origins, tls))
    )
    children.append(
        Child(
            "envoy",
            [
                str(Path(sys.executable).parent / "envoy"),
                "-c",
                str(config),
                "--base-id",
                str(port),
                "--log-level",
                "warning",
            ],
            env,
        )
    )
    stopping = False

    def stop(signum=None, frame=None):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    https = f" and https://127.0.0.1:{tls.port}" if tls else ""
    say(
        f"mesh on http://127.0.0.1:{port}{https} through Envoy (gateway :{env['GATEWAY_PORT']}, "
        f"MODEL_DIR={env['MODEL_DIR']}); Ctrl-C stops"
    )
    exit_code = 0
    while not stopping:
        for child in children:
            if child.process.poll() is None or child.restart_at is not None and time.monotonic() < child.restart_at:
                continue
            if child.restart_at is not None:
                child.start()
            elif child.process.returncode == CONFIG_ERROR and child.restarts == 0:
                say(f"{child.label} cannot start (exit {CONFIG_ERROR}: its configuration); stopping the mesh")
                exit_code, stopping = CONFIG_ERROR, True
            else:
                child.schedule_restart()
        time.sleep(0.2)
    for child in reversed(children):  # Envoy and the gateway first, so no new work reaches the services
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for child in children:
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
    shutil.rmtree(config.parent, ignore_errors=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
