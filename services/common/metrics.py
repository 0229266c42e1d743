"""Prometheus metrics every service exports, all named imagemesh_*."""

from prometheus_client import Counter, Gauge, Histogram, start_http_server

# Up to the gateway's upstream deadline: a large upscale on a 2-core CPU takes minutes.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900)

REQUESTS = Counter("imagemesh_grpc_requests", "gRPC requests handled", ["service", "method", "code"])
REQUEST_SECONDS = Histogram(
    "imagemesh_grpc_request_duration_seconds", "gRPC request duration", ["service", "method"], buckets=DURATION_BUCKETS
)
IN_FLIGHT = Gauge(
    "imagemesh_grpc_requests_in_flight",
    "streams doing this service's own work (not waiting for a slot, not only relaying the next service)",
    ["service", "method"],
)
QUEUE_DEPTH = Gauge("imagemesh_queue_depth", "streams waiting for a compute slot", ["service"])
REJECTED = Counter("imagemesh_requests_rejected", "requests refused because the service was full", ["service"])
CACHE_LOOKUPS = Counter("imagemesh_cache_lookups", "result cache lookups", ["service", "result"])
TILES = Counter("imagemesh_tiles_processed", "tiles processed", ["service", "model", "backend"])
INFERENCE_SECONDS = Histogram(
    "imagemesh_inference_seconds",
    "time per tile in the model (or resampler)",
    ["service", "model", "backend"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300),
)
BACKEND_SPEED = Gauge(
    "imagemesh_backend_megapixels_per_second",
    "calibration: input megapixels per second of each candidate backend",
    ["service", "model", "backend"],
)
BACKEND_CHOSEN = Gauge(
    "imagemesh_backend_chosen", "1 for the backend calibration chose", ["service", "model", "backend"]
)
MODEL_READY = Gauge("imagemesh_model_ready", "1 when the model is loaded and serving", ["service", "model", "backend"])

HTTP_REQUESTS = Counter(
    "imagemesh_http_requests", "HTTP requests handled by the gateway", ["route", "method", "status"]
)
HTTP_SECONDS = Histogram(
    "imagemesh_http_request_duration_seconds", "HTTP request duration", ["route", "method"], buckets=DURATION_BUCKETS
)
GATEWAY_PIXEL_BYTES = Gauge(
    "imagemesh_gateway_pixel_bytes", "bytes of decoded pixels the gateway holds (GATEWAY_MAX_PIXEL_BYTES bounds it)"
)
HTTP_IN_FLIGHT = Gauge("imagemesh_http_requests_in_flight", "HTTP requests being handled by the gateway")


def serve(host: str, port: int) -> None:
    """Expose /metrics on its own HTTP port (a daemon thread)."""
    start_http_server(port, addr=host)
