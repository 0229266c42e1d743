"""Bearer tokens and a per-client rate limit.

Tokens are kept only as SHA-256 digests and compared in constant time. With
no tokens configured the gateway is open (and says so at start); the rate
limit then applies per client address."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import time
from collections import OrderedDict

from fastapi import Request

from .errors import HttpError

MAX_TRACKED_CLIENTS = 10_000


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def client_address(request: Request, trusted_proxies: list) -> str:
    """The caller's address: the peer's, or, when the peer is a trusted proxy (Envoy),
    the address that proxy appended to X-Forwarded-For (the last entry: those before
    it are whatever the client claimed)."""
    peer = request.client.host if request.client else "unknown"
    forwarded = request.headers.get("x-forwarded-for", "")
    if forwarded and trusted_proxies:
        try:
            trusted = any(ipaddress.ip_address(peer) in network for network in trusted_proxies)
        except ValueError:
            trusted = False
        if trusted:
            return forwarded.split(",")[-1].strip() or peer
    return peer


class TokenAuth:
    def __init__(self, tokens: str, trusted_proxies: list | None = None):
        self._digests = [digest(t.strip()) for t in tokens.split(",") if t.strip()]
        self.trusted_proxies = trusted_proxies or []

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def identify(self, request: Request) -> str:
        """The caller's identity for rate limiting; raises 401 when a token is needed and wrong."""
        if not self.enabled:
            return f"addr:{client_address(request, self.trusted_proxies)}"
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HttpError(
                401, "unauthenticated", "this route needs Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"}
            )
        presented = digest(token.strip())
        matched = False
        for known in self._digests:  # no early exit: the time does not depend on which token matched
            matched |= hmac.compare_digest(presented, known)
        if not matched:
            raise HttpError(
                401,
                "unauthenticated",
                "the bearer token is not valid",
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return "token:" + presented.hex()[:16]


def rate_limited(tokens: float, rate: float) -> HttpError:
    """The refusal of a bucket holding `tokens` (less than one), refilled at `rate` a second."""
    retry = max(1, math.ceil((1.0 - tokens) / rate))
    return HttpError(429, "rate_limited", f"too many requests; retry in {retry} s", {"Retry-After": str(retry)})


class RateLimiter:
    """A token bucket per identity, in this process: `burst` requests at once, refilled
    at `per_minute` (state.RedisState keeps the same buckets in Redis for replicas)."""

    def __init__(self, per_minute: float, burst: int, clock=time.monotonic):
        self.rate = per_minute / 60.0
        self.burst = burst
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def check(self, identity: str) -> None:
        if self.rate <= 0:
            return
        now = self.clock()
        tokens, last = self._buckets.pop(identity, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[identity] = (tokens, now)
            raise rate_limited(tokens, self.rate)
        self._buckets[identity] = (tokens - 1.0, now)
        while len(self._buckets) > MAX_TRACKED_CLIENTS:
            self._buckets.popitem(last=False)
