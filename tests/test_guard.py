"""The address guard refuses internal addresses before any connection, and sends no packet to find out."""

from __future__ import annotations

import asyncio
import sys

import pytest

from pipeline.crawl.fetch import Fetcher, FetchSettings
from pipeline.crawl.guard import AddressGuard, parse_host

EVENTS: list[tuple[str, tuple]] = []
RECORDING = False


def _record(event, args):
    if RECORDING and event in ("socket.connect", "socket.getaddrinfo", "socket.sendto"):
        EVENTS.append((event, args))


sys.addaudithook(_record)


def fetch_all(urls, **guard):
    global RECORDING

    async def run():
        async with Fetcher(FetchSettings(timeout=2, retries=0), AddressGuard(**guard)) as fetcher:
            return [await fetcher.fetch(u) for u in urls]

    EVENTS.clear()
    RECORDING = True
    try:
        return asyncio.run(run())
    finally:
        RECORDING = False


INTERNAL = [
    "http://10.0.0.1/a.jpg",
    "http://172.16.5.4/a.jpg",
    "http://192.168.1.1/a.jpg",
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata service
    "http://224.0.0.1/a.jpg",  # multicast
    "http://0.0.0.0/a.jpg",
    "http://127.0.0.1/a.jpg",
    "http://[::1]/a.jpg",
    "http://[fe80::1]/a.jpg",
    "http://[::ffff:10.0.0.1]/a.jpg",  # IPv4-mapped IPv6
    "http://[fc00::5]/a.jpg",  # unique local
]


def test_internal_literals_are_refused_without_a_packet():
    results = fetch_all(INTERNAL)
    assert [r.reason for r in results] == ["blocked_address"] * len(INTERNAL)
    assert all("refused" in r.message for r in results)
    assert EVENTS == []  # no connect, no name lookup, nothing sent


# Every non-global class, in every spelling a URL can give it: (host as written, what the message must name).
# The Teredo client is stored inverted: ~f5ff:fffe is 10.0.0.1, ~80ff:fffe is 127.0.0.1.
SPELLINGS = [
    ("100.64.0.1", "a shared address (carrier-grade NAT, 100.64.0.0/10)"),
    ("100.100.100.200", "a cloud metadata endpoint (Alibaba Cloud)"),
    ("192.0.0.1", "an IETF protocol assignment (192.0.0.0/24)"),
    ("192.0.2.1", "a documentation address (TEST-NET-1, 192.0.2.0/24)"),
    ("198.18.0.1", "a benchmarking address (198.18.0.0/15)"),
    ("198.51.100.1", "a documentation address (TEST-NET-2"),
    ("203.0.113.1", "a documentation address (TEST-NET-3"),
    ("240.0.0.1", "a reserved address (future use, 240.0.0.0/4)"),
    ("255.255.255.255", "a broadcast address"),
    ("0.0.0.0", "a this-network address"),
    ("2130706433", "2130706433 (127.0.0.1): a loopback address (127.0.0.0/8)"),
    ("0177.0.0.1", "0177.0.0.1 (127.0.0.1): a loopback address"),
    ("0x7f.1", "0x7f.1 (127.0.0.1): a loopback address"),
    ("0X7F000001", "(127.0.0.1): a loopback address"),
    ("127.1", "127.1 (127.0.0.1): a loopback address"),
    ("10.1.1", "10.1.1 (10.1.0.1): a private address (10.0.0.0/8)"),
    ("0xa.0.010.1", "(10.0.8.1): a private address"),  # mixed hex, decimal, octal
    ("017700000001", "(127.0.0.1): a loopback address"),
    ("127.0.0.1.", "127.0.0.1. (127.0.0.1): a loopback address"),
    ("127%2E0%2E0%2E1", "(127.0.0.1): a loopback address"),  # hosts are percent-decoded first
    ("\uff11\uff12\uff17.\uff10.\uff10.\uff11", "a loopback address"),  # full-width digits
    ("[::ffff:127.0.0.1]", "an IPv4-mapped address wrapping 127.0.0.1, a loopback address"),
    ("[::ffff:7f00:1]", "an IPv4-mapped address wrapping 127.0.0.1"),
    ("[::10.0.0.1]", "an IPv4-compatible address wrapping 10.0.0.1, a private address"),
    ("[2002:0a00:0001::]", "a 6to4 address wrapping 10.0.0.1, a private address (10.0.0.0/8)"),
    ("[2002:7f00:1::1]", "a 6to4 address wrapping 127.0.0.1, a loopback address"),
    ("[2001:0:4136:e378:8000:63bf:f5ff:fffe]", "a Teredo address whose client is 10.0.0.1, a private address"),
    ("[2001:0:4136:e378:8000:63bf:80ff:fffe]", "a Teredo address whose client is 127.0.0.1, a loopback address"),
    ("[2001:0:a00:1:8000:63bf:f7f7:f7f7]", "a Teredo address whose server is 10.0.0.1, a private address"),
    ("[64:ff9b::10.0.0.1]", "a NAT64 address wrapping 10.0.0.1, a private address"),
    ("[64:ff9b:1::a00:1]", "a NAT64 address wrapping 10.0.0.1, a private address"),
    ("[64:ff9b:1:1::1]", "a local-use NAT64 address (64:ff9b:1::/48)"),
    ("[fec0::1]", "a site-local address (deprecated, fec0::/10)"),
    ("[fd00:ec2::254]", "a unique-local address (fc00::/7) and a cloud metadata endpoint (AWS IMDS"),
    ("[100::1]", "a discard-only address (100::/64)"),
    ("[2001:db8::1]", "a documentation address (2001:db8::/32)"),
    ("[2001:10::1]", "an ORCHID identifier"),
    ("[fe80::1%25eth0]", "a link-local address (fe80::/10)"),  # zone id
    ("[ff02::1]", "a multicast address (ff00::/8)"),
    ("168.63.129.16", "a cloud metadata endpoint (Azure WireServer)"),
    ("169.254.170.2", "a link-local address (169.254.0.0/16) and a cloud metadata endpoint"),
]


def test_every_spelling_of_a_non_global_address_is_refused_by_name_without_a_packet():
    results = fetch_all([f"http://{host}:8080/a.jpg" for host, _ in SPELLINGS])
    for (host, named), result in zip(SPELLINGS, results):
        assert result.reason == "blocked_address", (host, result)
        assert result.message.startswith("refused ") and named in result.message, (host, result.message)
    assert EVENTS == []


def test_names_resolving_to_any_non_global_class_are_refused_by_name():
    targets = {
        "cgnat.test": ("100.64.0.1", "a shared address (carrier-grade NAT"),
        "teredo.test": ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "a Teredo address whose client is 10.0.0.1"),
        "mapped.test": ("::ffff:127.0.0.1", "an IPv4-mapped address wrapping 127.0.0.1"),
        "azure.test": ("168.63.129.16", "a cloud metadata endpoint"),
        "sitelocal.test": ("fec0::1", "a site-local address"),
    }
    results = fetch_all([f"http://{name}/a.jpg" for name in targets], resolve={n: ip for n, (ip, _) in targets.items()})
    for (name, (_, named)), result in zip(targets.items(), results):
        assert result.reason == "blocked_address", (name, result)
        assert f"refused {name} (" in result.message and named in result.message, result.message
    assert EVENTS == []  # overridden names are never looked up


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "134744072", "[2002:0808:0808::1]", "[64:ff9b::8.8.8.8]", "2606:4700::1111", "1.1.1.1."]
)
def test_global_addresses_pass_in_any_spelling(address):
    assert AddressGuard().refusal(address) is None


def test_numeric_spellings_are_canonicalised():
    assert str(parse_host("134744072")) == "8.8.8.8"
    assert str(parse_host("0x8.0X8.010.8")) == "8.8.8.8"
    assert str(parse_host("8.526344")) == "8.8.8.8"
    assert str(parse_host("8.0x8.0")) == "8.8.0.0"
    assert parse_host("example.com") is None and parse_host("0x7g.example") is None
    assert AddressGuard().check_host("0x8.8.8.8") == "8.8.8.8"  # what the fetcher connects to
    assert AddressGuard().check_host("images.example") == "images.example"


def test_out_of_range_numeric_hosts_are_invalid_urls_without_a_packet():
    hosts = ["4294967296", "256.1.1.1", "1.2.3.4.5", "0x100000000", "1.2.3.09", "1.256.1", "images.0x1"]
    results = fetch_all([f"http://{host}/a.jpg" for host in hosts])
    assert [r.reason for r in results] == ["invalid_url"] * len(hosts), results
    assert EVENTS == []


def test_names_that_resolve_inside_are_refused_before_connecting():
    results = fetch_all(
        ["http://intranet.test/a.jpg", "http://metadata.test/", "http://localhost/a.jpg"],
        resolve={"intranet.test": "10.1.2.3", "metadata.test": "169.254.169.254"},
    )
    assert [r.reason for r in results] == ["blocked_address"] * 3
    assert not [e for e in EVENTS if e[0] == "socket.connect"]
    # Overridden names are never looked up; "localhost" is answered from the hosts file.
    assert {e[1][0] for e in EVENTS if e[0] == "socket.getaddrinfo"} <= {"localhost"}


def test_allowed_networks_and_overrides_reach_the_server(world, world_server):
    port = world_server.port
    before = world_server.requests["/img/0.jpg"]
    results = fetch_all(
        [f"http://world.test:{port}/img/0.jpg", f"http://127.0.0.1:{port}/img/0.jpg"],
        allow_networks=["127.0.0.1/32"],
        resolve={"world.test": "127.0.0.1"},
    )
    assert [r.reason for r in results] == [None, None]
    assert results[0].data == world.body(0)
    assert world_server.requests["/img/0.jpg"] == before + 2
    connects = [e[1][1] for e in EVENTS if e[0] == "socket.connect"]
    assert connects and all(address[0] == "127.0.0.1" for address in connects)


def test_an_allowed_address_in_another_spelling_is_fetched_from_its_canonical_address(world, world_server):
    # aiohttp itself refuses 2130706433; it works only because the fetcher connects to the canonical 127.0.0.1.
    port = world_server.port
    urls = [f"http://{host}:{port}/img/0.jpg" for host in ("2130706433", "0x7f.1", "127.0.0.1.")]
    results = fetch_all(urls, allow_networks=["127.0.0.1/32"])
    assert [r.reason for r in results] == [None] * 3 and results[0].data == world.body(0)
    connects = [e[1][1] for e in EVENTS if e[0] == "socket.connect"]
    assert connects and all(address[0] == "127.0.0.1" for address in connects)
    assert not [e for e in EVENTS if e[0] == "socket.getaddrinfo" and e[1][0] != "127.0.0.1"]


def test_a_redirect_inside_is_refused(world, world_server):
    row = next(r for r in world.rows if r["fault"] == "redirect_internal")["row"]
    before = world_server.requests[f"/img/{row}.jpg"]
    [result] = fetch_all([f"{world_server.base_url}/redirect_internal/{row}.jpg"], allow_networks=["127.0.0.1/32"])
    assert result.reason == "blocked_address" and "127.0.0.2" in result.message
    assert world_server.requests[f"/img/{row}.jpg"] == before


def test_bad_guard_settings_name_the_value():
    with pytest.raises(ValueError, match="not-a-network"):
        AddressGuard(allow_networks=["not-a-network"])
    with pytest.raises(ValueError, match="nowhere"):
        AddressGuard(resolve={"h": "nowhere"})
