"""Fetching `image_url` inputs without becoming a proxy into the network.

The host is resolved once; every address it resolves to must be a public
unicast one (or in the allowlist); the connection then goes to an address
that was checked (the Host header and TLS name stay the URL's host). Each
redirect is checked the same way, at most MAX_REDIRECTS of them; the body is
capped in bytes and the whole fetch in time."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import Awaitable, Callable
from urllib.parse import urljoin, urlsplit

import httpx

from services.common.errors import quoted

from .errors import HttpError

MAX_REDIRECTS = 5
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]


def refused(message: str) -> HttpError:
    return HttpError(400, "url_not_allowed", message)


def parse_networks(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()]


def address_problem(address: Address, allowlist=()) -> str | None:
    """Why an address may not be fetched from, or None when it may."""
    if any(address in network for network in allowlist):
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return "IPv4-mapped IPv6"  # a host that means IPv4 should resolve to IPv4
        embedded = address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None:
            return address_problem(embedded, allowlist) or "an IPv4 address embedded in IPv6"
    for check, what in (
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
        (address.is_unspecified, "unspecified"),
        (address.is_private, "private"),
        (address.is_reserved, "reserved"),
    ):
        if check:
            return what
    if not address.is_global:
        return "not a public address"
    return None


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass
class Target:
    url: str
    host: str
    port: int
    address: str  # the checked address the connection goes to


async def check_url(url: str, resolver: Resolver, allowlist=()) -> Target:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parsed lazily: a bad port or bracket raises here)
    except ValueError:
        raise refused("image_url is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise refused("image_url must be an http or https URL")
    if not parts.hostname:
        raise refused("image_url has no host")
    if parts.username or parts.password:
        raise refused("image_url must not carry credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise refused("image_url has an invalid port") from None
    host = parts.hostname
    try:
        literal = ipaddress.ip_address(host)
        addresses = [str(literal)]
    except ValueError:
        try:
            addresses = await resolver(host, port)
        except (OSError, UnicodeError):
            raise refused(f"image_url host {quoted(host)} does not resolve") from None
    if not addresses:
        raise refused(f"image_url host {quoted(host)} does not resolve")
    for text in addresses:
        problem = address_problem(ipaddress.ip_address(text.split("%")[0]), allowlist)
        if problem:
            raise refused(f"image_url host {quoted(host)} resolves to a {problem} address ({text}); refused")
    return Target(url, host, port, addresses[0].split("%")[0])


class UrlFetcher:
    def __init__(
        self,
        *,
        max_bytes: int,
        timeout_seconds: float,
        allowlist: str = "",
        resolver: Resolver = system_resolver,
        enabled: bool = True,
    ):
        self.max_bytes, self.timeout, self.enabled = max_bytes, timeout_seconds, enabled
        self.allowlist = parse_networks(allowlist)
        self.resolver = resolver

    async def fetch(self, url: str) -> bytes:
        if not self.enabled:
            raise refused("this gateway does not fetch image_url (URL_FETCH_ENABLED=false); send the image itself")
        try:
            return await asyncio.wait_for(self._fetch(url), self.timeout)
        except asyncio.TimeoutError:
            raise HttpError(422, "url_fetch_failed", f"image_url took longer than {self.timeout:g} s") from None

    async def _fetch(self, url: str) -> bytes:
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=self.timeout) as client:
            for _ in range(MAX_REDIRECTS + 1):
                target = await check_url(url, self.resolver, self.allowlist)
                parts = urlsplit(url)
                connect_host = f"[{target.address}]" if ":" in target.address else target.address
                pinned = parts._replace(netloc=f"{connect_host}:{target.port}").geturl()
                headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "User-Agent": "imagemesh/1.0", "Accept": "image/*"}
                try:
                    async with client.stream(
                        "GET", pinned, headers=headers, extensions={"sni_hostname": target.host}
                    ) as response:
                        if response.is_redirect:
                            location = response.headers.get("location", "")
                            if not location:
                                raise HttpError(422, "url_fetch_failed", "image_url redirected nowhere")
                            url = urljoin(url, location)
                            continue
                        if response.status_code != 200:
                            raise HttpError(422, "url_fetch_failed", f"image_url answered HTTP {response.status_code}")
                        declared = response.headers.get("content-length", "")
                        if declared.isdigit() and int(declared) > self.max_bytes:
                            raise HttpError(
                                413,
                                "upload_too_large",
                                f"image_url is {declared} bytes; images may be {self.max_bytes} bytes",
                            )
                        body = bytearray()
                        async for chunk in response.aiter_bytes():
                            body += chunk
                            if len(body) > self.max_bytes:
                                raise HttpError(413, "upload_too_large", f"image_url is over {self.max_bytes} bytes")
                        return bytes(body)
                except httpx.HTTPError as exc:
                    raise HttpError(422, "url_fetch_failed", f"image_url could not be fetched: {exc}") from None
            raise HttpError(422, "url_fetch_failed", f"image_url redirected more than {MAX_REDIRECTS} times")
