"""The address checks that guard image_url fetching, and the rate limiter, in-process: no connection leaves loopback."""

import asyncio
import ipaddress

import pytest

from services.common.failures import HttpError
from services.gateway.auth import RateLimiter
from services.gateway.urlfetch import address_problem, check_url, parse_networks


def test_rate_limiter_refills_per_identity():
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=2, clock=lambda: now[0])
    limiter.check("a")
    limiter.check("a")
    with pytest.raises(HttpError) as info:
        limiter.check("a")
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "1"
    limiter.check("b")  # its own bucket
    now[0] = 1.0
    limiter.check("a")  # one token back after a second


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.0.0.2",
        "::1",
        "10.1.2.3",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "224.0.0.1",
        "ff02::1",
        "0.0.0.0",
        "::",
        "100.64.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",
        "198.18.0.1",
        "2001:db8::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:93.184.216.34",
        "2002:7f00:1::1",
        "2002:a00:1::1",
    ],
)
def test_non_public_addresses_are_refused(address):
    assert address_problem(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass_the_check(address):
    assert address_problem(ipaddress.ip_address(address)) is None


def test_allowlist_admits_only_its_networks():
    allow = parse_networks("127.0.0.1/32, 10.9.0.0/16")
    assert address_problem(ipaddress.ip_address("127.0.0.1"), allow) is None
    assert address_problem(ipaddress.ip_address("10.9.8.7"), allow) is None
    assert address_problem(ipaddress.ip_address("127.0.0.2"), allow) == "loopback"


def _resolver(table):
    async def resolve(host, port):
        if host not in table:
            raise OSError("no such host")
        return table[host]

    return resolve


@pytest.mark.parametrize(
    "url, table, message",
    [
        ("ftp://example.com/a.png", {}, "http or https"),
        ("http://user:pw@example.com/a.png", {}, "credentials"),
        ("http://localhost/a.png", {"localhost": ["127.0.0.1", "::1"]}, "loopback"),
        ("http://mixed.example/a.png", {"mixed.example": ["93.184.216.34", "10.0.0.5"]}, "private"),
        ("http://metadata.example/latest", {"metadata.example": ["169.254.169.254"]}, "link-local"),
        ("http://[::ffff:7f00:1]/a.png", {}, "IPv4-mapped"),
        ("http://nowhere.example/a.png", {}, "does not resolve"),
        ("http://0x7f000001/a.png", {"0x7f000001": ["127.0.0.1"]}, "loopback"),
    ],
)
def test_check_url_refuses_before_connecting(url, table, message):
    with pytest.raises(HttpError) as info:
        asyncio.run(check_url(url, _resolver(table)))
    assert info.value.status == 400 and message in info.value.message


def test_check_url_pins_the_checked_address():
    target = asyncio.run(
        check_url("https://images.example:8443/p.png", _resolver({"images.example": ["93.184.216.34"]}))
    )
    assert (target.host, target.port, target.address) == ("images.example", 8443, "93.184.216.34")
