"""What every gRPC service runs on: a grpc.aio server with grpc.health.v1
(NOT_SERVING while loading and draining), reflection, a /metrics endpoint, a
concurrency limit that answers RESOURCE_EXHAUSTED instead of queueing without
bound, request ids from gRPC metadata, errors mapped to status codes, and a
graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import inspect
import itertools
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Awaitable, Callable, Generic, TypeVar, cast

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Gauge

from . import logs, metrics
from .config import ServiceConfig
from .errors import Overloaded, ServiceError, StreamEndedEarly, error_trailer

# Set by a service on the streams it opens to forward a pipeline; Envoy removes it
# from outside calls (deploy/envoy), so only the mesh itself can mark a hop.
HOP_HEADER = "x-imagemesh-hop"
# Liveness (the process answers) is its own health entry: SERVING from the
# start, so that a liveness probe never kills a pod that is loading models.
LIVENESS = "liveness"
# Spread calls over every address a name resolves to (a headless Service's pods).
CHANNEL_OPTIONS = (("grpc.lb_policy_name", "round_robin"),)
# How long a stream that ended early waits for the cancellation that may have ended it.
CANCELLATION_GRACE_SECONDS = 0.1


T = TypeVar("T")


def channel_target(address: str) -> str:
    """A gRPC target for a setting: `host:port`, a DNS name that resolves to
    several addresses, or a comma-separated list of IP:port (replicas)."""
    parts = [part.strip() for part in address.split(",") if part.strip()]
    if len(parts) <= 1:
        return address.strip()
    scheme = "ipv6" if all(part.startswith("[") for part in parts) else "ipv4"
    return f"{scheme}:{','.join(parts)}"


def replica_count(address: str) -> int:
    return max(1, len([part for part in address.split(",") if part.strip()]))


logger = logging.getLogger("imagemesh.server")


class StreamLimiter:
    """How much work a service takes on. At most `max_active + max_queued` streams are
    open at once (one more is refused at once: RESOURCE_EXHAUSTED), and at most
    `max_active` of them compute at a time, each in a compute slot, the earliest-admitted
    stream first; a stream's computations share its slot, up to `computations_per_stream`
    at once, on a thread pool of `max_active * computations_per_stream`. A stream holds a
    compute slot only while it computes, never while it waits for its input or for the
    next service, so a pipeline that passes through a service twice, or two pipelines
    that cross, never wait on each other."""

    def __init__(self, service: str, max_active: int, max_queued: int, computations_per_stream: int = 1):
        self.service = service
        self.max_open = max_active + max_queued
        self.executor = ThreadPoolExecutor(max_workers=max_active * computations_per_stream, thread_name_prefix=service)
        self.open = 0
        self._free = max_active
        self._waiting: list[tuple[int, asyncio.Future]] = []  # a heap: earliest admission first
        self._admissions = itertools.count()
        metrics.REJECTED.labels(service).inc(0)  # the series exists before the first rejection
        metrics.QUEUE_DEPTH.labels(service).set(0)

    def admit(self, method: str, hop: bool = False) -> "Admission":
        """Admit a stream, or refuse it when the service is full. A later hop of a request
        admitted upstream (`hop`) is part of work already taken on: refusing it would fail
        that request midway, so it is admitted, and computes through the same slots."""
        if self.open >= self.max_open and not hop:
            metrics.REJECTED.labels(self.service).inc()
            raise Overloaded(f"{self.service} is busy ({self.open} requests open); retry later")
        return Admission(self, method, next(self._admissions))

    async def _acquire(self, order: int, in_flight: Gauge) -> None:
        if self._free and not self._waiting:
            self._free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (order, waiter))
        self._count_waiting()
        in_flight.dec()  # queued, not in flight, while it waits
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # granted as it was cancelled: pass the slot on
            raise
        finally:  # out of the queue before in flight: a scrape between the two never counts it twice
            self._count_waiting()
            in_flight.inc()

    def _release(self) -> None:
        while self._waiting:
            _, waiter = heapq.heappop(self._waiting)
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    def _count_waiting(self) -> None:
        metrics.QUEUE_DEPTH.labels(self.service).set(sum(not w.done() for _, w in self._waiting))


class Admission:
    """One admitted stream: in flight until its own work is done (`finish`), not
    while it only relays the next service's answer, nor while it waits for a compute
    slot (then it counts in the queue depth)."""

    def __init__(self, limiter: StreamLimiter, method: str, order: int):
        self.limiter, self.order = limiter, order
        self._in_flight = metrics.IN_FLIGHT.labels(limiter.service, method)
        self._in_flight.inc()
        limiter.open += 1
        self._finished = False
        self._computing = 0  # computations of this stream running in its slot
        self._taking_slot = asyncio.Lock()

    async def compute(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the service's thread pool in the stream's compute slot: taken,
        once one is free, by its first computation; shared by those that start while it
        runs (a stream may render several tiles at once); given back when none is left."""
        async with self._taking_slot:
            if not self._computing:
                await self.limiter._acquire(self.order, self._in_flight)
            self._computing += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.limiter.executor, fn, *args)
        finally:
            self._computing -= 1
            if not self._computing:
                self.limiter._release()

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._in_flight.dec()
            self.limiter.open -= 1


class MethodAwarePool:
    """The default descriptor pool, also resolving methods (`package.Service.Method`):
    upb's pool finds only messages, enums and services, and grpcurl asks reflection
    for a method by its full name."""

    def __init__(self, pool: descriptor_pool.DescriptorPool):
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str):  # noqa: N802 (the pool's own name)
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service, _, method = symbol.rpartition(".")
            if service and method in self._pool.FindServiceByName(service).methods_by_name:
                return self._pool.FindServiceByName(service).file
            raise


def _metadata_value(context: grpc.aio.ServicerContext, key: str) -> str:
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return ""


ServiceConfigT = TypeVar("ServiceConfigT", bound=ServiceConfig)


class ServiceRuntime(Generic[ServiceConfigT]):
    def __init__(
        self, service: str, descriptor: ServiceDescriptor, config: ServiceConfigT, port: int, metrics_port: int
    ):
        """`descriptor` is the service's own, from its generated `_pb2` module: taking it
        (not a name) registers that .proto file for reflection, which resolves a service
        only from files in the default descriptor pool."""
        self.service = service
        self.grpc_service_name = descriptor.full_name
        self.config = config
        self.port = port
        self.metrics_port = metrics_port
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server()  # built in the serving event loop (the services' async main)
        self.limiter = StreamLimiter(
            service, config.max_concurrent_requests, config.max_queued_requests, config.renders_per_request
        )

    @contextlib.asynccontextmanager
    async def call(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        request_id = logs.request_id_or_new(_metadata_value(context, logs.REQUEST_ID_HEADER))
        token = logs.request_id_var.set(request_id)
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            await context.send_initial_metadata(((logs.REQUEST_ID_HEADER, request_id),))
            yield
        except ServiceError as exc:
            if isinstance(exc, StreamEndedEarly):
                # A cancellation that ended the request stream cancels this task within
                # moments: wait for it rather than refuse (and count) a cancelled call.
                code = grpc.StatusCode.CANCELLED
                await asyncio.sleep(CANCELLATION_GRACE_SECONDS)
            code = exc.code
            context.set_trailing_metadata(error_trailer(exc))
            logs.log(
                logger,
                logging.INFO,
                "request refused",
                method=method,
                code=code.name,
                reason=exc.reason,
                error=exc.message,
            )
            await context.abort(code, exc.message)
        except (asyncio.CancelledError, grpc.aio.AbortError, GeneratorExit):
            # GeneratorExit: the stream was closed at a reply it was waiting to send
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            logger.exception("unhandled error in %s", method)
            await context.abort(code, f"internal error (request id {request_id})")
        finally:
            metrics.REQUESTS.labels(self.service, method, code.name).inc()
            metrics.REQUEST_SECONDS.labels(self.service, method).observe(time.perf_counter() - started)
            with contextlib.suppress(ValueError):  # closed by the event loop's finaliser, in another context
                logs.request_id_var.reset(token)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", self.grpc_service_name):
            await self.health.set(name, status)

    async def start(self, add_servicer: Callable[[grpc.aio.Server], None]) -> int:
        """Bind and start serving (NOT_SERVING until set_serving(True)); returns the bound port."""
        add_servicer(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (self.grpc_service_name, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self.server,
            pool=MethodAwarePool(descriptor_pool.Default()),
        )
        await self.set_serving(False)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        bound = self.server.add_insecure_port(f"{self.config.bind_host}:{self.port}")
        if bound == 0:
            raise SystemExit(f"imagemesh: cannot listen on {self.config.bind_host}:{self.port}")
        await self.server.start()
        if self.metrics_port:
            metrics.serve(self.config.bind_host, self.metrics_port)
        self.port = bound
        logs.log(logger, logging.INFO, "listening", port=bound, metrics_port=self.metrics_port)
        return bound

    async def drain(self) -> None:
        """Stop taking new calls, let in-flight streams finish within the grace period."""
        logs.log(logger, logging.INFO, "draining", grace_seconds=self.config.drain_seconds)
        await self.set_serving(False)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.drain_seconds)
        logs.log(logger, logging.INFO, "stopped")


RpcMethod = TypeVar("RpcMethod", bound=Callable[..., Any])


def rpc() -> Callable[[RpcMethod], RpcMethod]:
    """Wrap a servicer method (unary or response-streaming) with request ids,
    metrics and error mapping. The servicer must have a `runtime` attribute."""

    def decorate(fn: RpcMethod) -> RpcMethod:
        method = fn.__name__
        if inspect.isasyncgenfunction(fn):

            @functools.wraps(fn)
            async def stream_wrapper(self, request, context):
                async with self.runtime.call(method, context), contextlib.aclosing(fn(self, request, context)) as items:
                    async for item in items:
                        yield item

            return cast(RpcMethod, stream_wrapper)

        @functools.wraps(fn)
        async def unary_wrapper(self, request, context):
            async with self.runtime.call(method, context):
                return await fn(self, request, context)

        return cast(RpcMethod, unary_wrapper)

    return decorate


async def serve(
    runtime: ServiceRuntime, add_servicer: Callable[[grpc.aio.Server], None], load: Callable[[], Awaitable[Any]]
) -> None:
    """Start, load models (NOT_SERVING meanwhile), serve until SIGTERM/SIGINT, drain."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await runtime.start(add_servicer)
    await load()
    await runtime.set_serving(True)
    logs.log(logger, logging.INFO, "serving", port=runtime.port)
    await stop.wait()
    await runtime.drain()
