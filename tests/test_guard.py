"""The address guard refuses internal addresses before any connection, and sends no packet to find out."""

from __future__ import annotations

import asyncio
import sys

import pytest

from pipeline.crawl.fetch import Fetcher, FetchSettings
from pipeline.crawl.guard import AddressGuard

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
