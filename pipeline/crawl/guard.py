"""Refuse to connect to internal addresses: a URL list must not be a way into the crawler's own network.

Only globally routable addresses pass, whatever the spelling. Three layers:

- URL hosts that are IP literals are parsed by *our* rules (WHATWG URL / inet_aton: `2130706433`, `0177.0.0.1`,
  `0x7f.1`, `127.1`, a trailing dot, IPv6 zone ids), not by whatever the installed yarl/aiohttp happen to do.
  The fetcher then connects to the canonical address it was given (`check_host`'s return value), so the
  connection goes exactly where the check looked.
- Names are checked on the addresses they *resolve to*, inside the resolver the HTTP client connects with, so
  a name cannot pass the check and then connect somewhere else (DNS rebinding).
- IPv6 forms that carry an IPv4 address (mapped, compatible, translated, 6to4, Teredo, NAT64) are judged by
  the IPv4 inside: that is where the packets end up.

A refusal names the address class ("a private address (10.0.0.0/8)") so a crawl's summary says why.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import unquote

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# IANA special-purpose registries (iana-ipv4-special-registry, iana-ipv6-special-registry) plus multicast:
# (network, class, detail). Everything here is refused even where Python's `is_global` (whose tables vary
# between patch releases) calls it global. The most specific network names the class.
SPECIAL_NETWORKS = (
    ("0.0.0.0/8", "a this-network address", ""),
    ("0.0.0.0/32", "a this-network address", "this host"),
    ("10.0.0.0/8", "a private address", ""),
    ("100.64.0.0/10", "a shared address", "carrier-grade NAT"),
    ("127.0.0.0/8", "a loopback address", ""),
    ("169.254.0.0/16", "a link-local address", ""),
    ("172.16.0.0/12", "a private address", ""),
    ("192.0.0.0/24", "an IETF protocol assignment", ""),
    ("192.0.2.0/24", "a documentation address", "TEST-NET-1"),
    ("192.88.99.0/24", "a 6to4 relay anycast address", "deprecated"),
    ("192.168.0.0/16", "a private address", ""),
    ("198.18.0.0/15", "a benchmarking address", ""),
    ("198.51.100.0/24", "a documentation address", "TEST-NET-2"),
    ("203.0.113.0/24", "a documentation address", "TEST-NET-3"),
    ("224.0.0.0/4", "a multicast address", ""),
    ("240.0.0.0/4", "a reserved address", "future use"),
    ("255.255.255.255/32", "a broadcast address", "limited broadcast"),
    ("::/128", "an unspecified address", ""),
    ("::1/128", "a loopback address", ""),
    ("::/8", "a reserved address", "IETF"),
    # Only reached for local-use NAT64 addresses not in the /96 form the guard can decode (see _embedded).
    ("64:ff9b:1::/48", "a local-use NAT64 address", ""),
    ("100::/64", "a discard-only address", ""),
    ("2001::/23", "an IETF protocol assignment", ""),
    ("2001:2::/48", "a benchmarking address", ""),
    # ORCHIDs are cryptographic identifiers, not locators: nothing routes to them, whatever is_global says.
    ("2001:10::/28", "an ORCHID identifier", "deprecated"),
    ("2001:20::/28", "an ORCHID identifier", "ORCHIDv2"),
    ("2001:db8::/32", "a documentation address", ""),
    ("3fff::/20", "a documentation address", ""),
    ("5f00::/16", "an SRv6 SID address", ""),
    ("fc00::/7", "a unique-local address", ""),
    ("fe80::/10", "a link-local address", ""),
    ("fec0::/10", "a site-local address", "deprecated"),
    ("ff00::/8", "a multicast address", ""),
)
_SPECIAL = sorted(
    ((ipaddress.ip_network(net), name, detail) for net, name, detail in SPECIAL_NETWORKS),
    key=lambda entry: -entry[0].prefixlen,
)

# Instance metadata and host-agent endpoints hand out credentials: refused even where the address is global
# (Azure's WireServer is). Names such as metadata.google.internal resolve to these and are refused there.
METADATA_ENDPOINTS = {
    ipaddress.ip_address(address): provider
    for address, provider in (
        ("169.254.169.254", "AWS, GCP, Azure, OpenStack and others"),
        ("169.254.170.2", "AWS ECS task credentials"),
        ("169.254.170.23", "AWS EKS Pod Identity"),
        ("169.254.0.23", "Tencent Cloud"),
        ("100.100.100.200", "Alibaba Cloud"),
        ("168.63.129.16", "Azure WireServer"),
        ("192.0.0.192", "Oracle Cloud"),
        ("fd00:ec2::254", "AWS IMDS over IPv6"),
        ("fd00:ec2::23", "AWS EKS Pod Identity over IPv6"),
        ("fd20:ce::254", "GCP over IPv6"),
    )
}

_SIXTOFOUR = ipaddress.ip_network("2002::/16")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/96")  # the /96 form inside local-use 64:ff9b:1::/48
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT's IPv4-translated addresses
_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated IPv4-compatible addresses (:: and ::1 excepted)


class BlockedAddress(OSError):
    """A host is, or resolved to, an address the guard refuses; raised before any connection is attempted."""


def _ipv4_number(part: str) -> int | None:
    """WHATWG's IPv4 number parser: decimal, `0x` hex (bare `0x` is 0), leading-`0` octal; None if invalid."""
    radix = 10
    if part[:2] in ("0x", "0X"):
        radix, part = 16, part[2:]
        if not part:
            return 0
    elif len(part) > 1 and part[0] == "0":
        radix, part = 8, part[1:]
    digits = "0123456789abcdef"[:radix]
    if not part or any(c not in digits for c in part.lower()):
        return None
    return int(part, radix)


def parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a host spells as WHATWG URL (and inet_aton) read it, or None for a domain name.

    A host whose last label is a number is an address or nothing: `256.1.1.1` and `4294967296` raise
    ValueError (an invalid URL) rather than go to a resolver that might read them its own way."""
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()  # "127.0.0.1." is 127.0.0.1
    last = parts[-1]
    if not (last.isascii() and last.isdigit()) and (not last or _ipv4_number(last) is None):
        return None  # does not end in a number: a domain name
    numbers = [_ipv4_number(p) for p in parts]
    if len(numbers) > 4 or None in numbers:
        raise ValueError(f"{host!r} looks numeric but is not an IPv4 address")
    *leading, last_number = numbers
    if any(n > 255 for n in leading) or last_number >= 256 ** (5 - len(numbers)):
        raise ValueError(f"{host!r} is out of range for an IPv4 address")
    return ipaddress.IPv4Address(sum(n << 8 * (3 - i) for i, n in enumerate(leading)) + last_number)


def parse_host(host: str) -> IPAddress | None:
    """The IP address a URL host names, in any spelling, or None for a domain name.

    Accepts what yarl's `raw_host` holds (percent-encoded, IPv6 without brackets, `%25` before a zone id) as
    well as a bracketed literal. ValueError for a host that is numeric-looking but not a valid address."""
    text = unquote(host)  # WHATWG percent-decodes a host before reading it: 127%2E0%2E0%2E1 is 127.0.0.1
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text)  # keeps a zone id as scope_id
        except ValueError:
            raise ValueError(f"{host!r} is not a valid IPv6 address") from None
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")  # full-width digits and dots, as IDNA maps them
        except UnicodeError:
            return None  # no ASCII form: a name the client cannot send either
    return parse_ipv4(text.lower())


def _embedded(ip: IPAddress) -> list[tuple[str, ipaddress.IPv4Address]]:
    """The IPv4 addresses an IPv6 address carries, with how it carries them; [] for none."""
    if ip.version == 4:
        return []
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.ipv4_mapped:
        return [("an IPv4-mapped address wrapping", ip.ipv4_mapped)]
    if ip in _TRANSLATED:
        return [("an IPv4-translated address wrapping", low32)]
    if ip in _COMPATIBLE and int(ip) > 1:
        return [("an IPv4-compatible address wrapping", low32)]
    if ip.sixtofour:
        return [("a 6to4 address wrapping", ip.sixtofour)]
    if ip.teredo:
        server, client = ip.teredo
        return [("a Teredo address whose server is", server), ("a Teredo address whose client is", client)]
    if ip in _NAT64 or ip in _NAT64_LOCAL:
        return [("a NAT64 address wrapping", low32)]
    return []


def _unscoped(ip: IPAddress) -> IPAddress:
    """The address without an IPv6 zone id: the zone picks an interface, not a different address."""
    return ipaddress.IPv6Address(int(ip)) if ip.version == 6 and ip.scope_id else ip


class AddressGuard:
    """`allow_networks`: CIDRs exempt from the guard (e.g. `127.0.0.1/32` for a local test server).
    `resolve`: host → IP overrides, like curl's `--resolve`; overridden addresses are checked too."""

    def __init__(self, allow_networks=(), resolve=None):
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in allow_networks or ()]
        self.overrides = {h.lower(): str(ipaddress.ip_address(ip)) for h, ip in (resolve or {}).items()}

    def refusal(self, address: str) -> str | None:
        """Why `address` (an IP in any spelling: `134744072`, `[::ffff:7f00:1]`) may not be contacted, or None.
        ValueError if it is not an IP address."""
        ip = parse_host(address)
        if ip is None:
            raise ValueError(f"{address!r} is not an IP address")
        return self._judge(_unscoped(ip))

    def _judge(self, ip: IPAddress) -> str | None:
        if any(ip.version == net.version and ip in net for net in self.allowed):
            return None
        carried = _embedded(ip)
        if carried:
            for how, inner in carried:
                reason = self._judge(inner)
                if reason:
                    return f"{how} {inner}, {reason}"
            return None
        special = next((entry for entry in _SPECIAL if ip.version == entry[0].version and ip in entry[0]), None)
        if special:
            network, name, detail = special
            reason = f"{name} ({detail}, {network})" if detail else f"{name} ({network})"
        elif not ip.is_global or ip.is_reserved:
            reason = "a reserved address" if ip.is_reserved else "a non-global address"
        else:
            reason = None
        provider = METADATA_ENDPOINTS.get(ip)
        if provider:
            metadata = f"a cloud metadata endpoint ({provider})"
            reason = f"{reason} and {metadata}" if reason else metadata
        return reason

    def check_host(self, host: str) -> str:
        """The host to connect to: an IP literal in any spelling becomes its canonical address, a name stays
        as it is (it is checked at resolution). BlockedAddress for a refused literal, ValueError for one that
        is not a valid address."""
        ip = parse_host(host)
        if ip is None:
            return host
        reason = self._judge(_unscoped(ip))
        if reason:
            shown = host.strip("[]")  # as written, so the message shows the spelling that was refused
            spelled = shown if shown == str(ip) else f"{shown} ({ip})"
            raise BlockedAddress(f"refused {spelled}: {reason}")
        return str(ip)


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
                raise BlockedAddress(f"refused {host} ({result['host']}): {reason}")
        return results

    async def close(self) -> None:
        await self._system.close()
