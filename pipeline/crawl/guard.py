"""Refuse to connect to internal addresses: a URL list must not be a way into the crawler's own network.

The check runs on the addresses a host *resolves to*, inside the resolver the HTTP client connects with, so
a name cannot pass the check and then connect somewhere else (DNS rebinding): the connection goes to the
very addresses that were checked. IP literals never reach a resolver, so `check_host` checks them first.
"""

from __future__ import annotations

import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver


class BlockedAddress(OSError):
    """A host resolved to an address the guard refuses; raised before any connection is attempted."""


class AddressGuard:
    """`allow_networks`: CIDRs exempt from the guard (e.g. `127.0.0.1/32` for a local test server).
    `resolve`: host → IP overrides, like curl's `--resolve`; overridden addresses are checked too."""

    def __init__(self, allow_networks=(), resolve=None):
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in allow_networks or ()]
        self.overrides = {h.lower(): str(ipaddress.ip_address(ip)) for h, ip in (resolve or {}).items()}

    def refusal(self, address: str) -> str | None:
        """Why `address` may not be contacted, or None if it may."""
        ip = ipaddress.ip_address(address.split("%")[0])  # drop an IPv6 zone id
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
        if any(ip in net for net in self.allowed):
            return None
        for attribute in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
            if getattr(ip, f"is_{attribute}"):
                return f"{address} is a {attribute.replace('_', '-')} address"
        return None

    def check_host(self, host: str) -> None:
        """Raise BlockedAddress for an IP literal the guard refuses; names are checked at resolution."""
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return
        reason = self.refusal(host.strip("[]"))
        if reason:
            raise BlockedAddress(f"refused {host}: {reason}")


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that applies the guard's overrides and refuses internal addresses."""

    def __init__(self, guard: AddressGuard):
        self.guard = guard
        self._system = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        override = self.guard.overrides.get(host.lower())
        if override is not None:
            ip = ipaddress.ip_address(override)
            results = [
                ResolveResult(
                    hostname=host,
                    host=override,
                    port=port,
                    family=socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                    proto=0,
                    flags=socket.AI_NUMERICHOST,
                )
            ]
        else:
            results = await self._system.resolve(host, port, family)
        for result in results:
            reason = self.guard.refusal(result["host"])
            if reason:
                raise BlockedAddress(f"refused {host}: {reason}")
        return results

    async def close(self) -> None:
        await self._system.close()
