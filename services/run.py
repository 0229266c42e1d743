"""python -m services.run: the whole mesh in the foreground on loopback.

Starts every service and the gateway as child processes. Ctrl-C or SIGTERM
drains and stops them all; if one dies, the others are stopped too. Children
get SIGKILL from the kernel if this process is killed outright, so nothing is
left orphaned."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# Services in start order, with their default ports; the gateway last.
SERVICES = {"upscaler": (50051, 9051), "bgremoval": (50052, 9052), "effects": (50053, 9053)}
# Replica i of a service listens on the first replica's ports + i * REPLICA_PORT_STEP.
REPLICA_PORT_STEP = 10
STOP_GRACE_SECONDS = 35
PR_SET_PDEATHSIG = 1
# State of a mesh started here, kept in the checkout so that two meshes on one
# machine never share a database or a result folder (each path can be set).
STATE_DIR = Path(__file__).resolve().parent.parent / "var"
STATE_DEFAULTS = {"RESULT_DIR": STATE_DIR / "results", "BGREMOVAL_DB": STATE_DIR / "bgremoval.sqlite3",
                  "ONNX_CACHE_DIR": STATE_DIR / "cache" / "onnx"}


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main() -> int:
    env = dict(os.environ)
    env.setdefault("MODEL_DIR", "./models")
    for name, path in STATE_DEFAULTS.items():
        env.setdefault(name, str(path))
    plans = []  # (module, its own environment)
    for name, (default_port, default_metrics) in SERVICES.items():
        upper = name.upper()
        port = int(env.get(f"{upper}_PORT", default_port))
        metrics_port = int(env.get(f"{upper}_METRICS_PORT", default_metrics))
        replicas = int(env.get(f"{upper}_REPLICAS", "1"))
        ports = [port + i * REPLICA_PORT_STEP for i in range(replicas)]
        env.setdefault(f"{upper}_ADDRESS", ",".join(f"127.0.0.1:{p}" for p in ports))
        for i, replica_port in enumerate(ports):
            plans.append((f"services.{name}", {f"{upper}_PORT": str(replica_port),
                                               f"{upper}_METRICS_PORT": str(metrics_port and metrics_port + i * REPLICA_PORT_STEP)}))
    plans.append(("services.gateway", {}))
    children = [subprocess.Popen([sys.executable, "-m", module], env={**env, **own}, preexec_fn=_die_with_parent)
                for module, own in plans]
    stopping = False

    def stop(signum=None, frame=None):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    port = env.get("GATEWAY_PORT", "8080")
    print(f"imagemesh: gateway on http://127.0.0.1:{port} (MODEL_DIR={env['MODEL_DIR']}); Ctrl-C stops",
          file=sys.stderr, flush=True)
    exit_code = 0
    while not stopping:
        for child in children:
            if child.poll() is not None:
                print(f"imagemesh: {child.args[-1]} exited with {child.returncode}; stopping the mesh",
                      file=sys.stderr, flush=True)
                exit_code = child.returncode or 1
                stopping = True
        time.sleep(0.2)
    for child in reversed(children):  # the gateway first, so no new work reaches the services
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
