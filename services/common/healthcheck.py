"""A container health check: exit 0 when healthy, 1 otherwise.

python -m services.common.healthcheck grpc 127.0.0.1:50051 [SERVICE]
python -m services.common.healthcheck http http://127.0.0.1:8080/healthz
"""

import sys
import urllib.request


def check_grpc(address: str, service: str = "") -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def check_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "grpc":
        return 0 if check_grpc(argv[1], argv[2] if len(argv) > 2 else "") else 1
    if len(argv) == 2 and argv[0] == "http":
        return 0 if check_http(argv[1]) else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
