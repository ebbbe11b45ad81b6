"""Fetching one URL politely and safely: redirects by hand, a byte cap, opt-outs, retries for transient faults.

Every outcome is a `Fetched`: the body, or a short `reason` code and a human message. Reason codes are the
vocabulary of the crawl's parquet, stats and summary.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import aiohttp
from yarl import URL

from pipeline.crawl.guard import AddressGuard, BlockedAddress, GuardedResolver

REDIRECTS = {301, 302, 303, 307, 308}
# Worth another try: the same request may pass later.
TRANSIENT_REASONS = {"timeout", "connection_error", "dns_error", "http_408", "http_429"} | {
    f"http_{code}" for code in range(500, 600)
}
# Directives with a value after the colon: "max-snippet: 20" does not name a bot.
VALUED_DIRECTIVES = {"max-snippet", "max-image-preview", "max-video-preview", "unavailable_after"}


@dataclass
class Fetched:
    data: bytes | None = None
    reason: str | None = None
    message: str | None = None

    @property
    def transient(self) -> bool:
        return self.reason in TRANSIENT_REASONS


@dataclass
class FetchSettings:
    timeout: float = 10.0
    retries: int = 2
    retry_backoff: float = 0.5
    max_bytes: int = 32 << 20
    max_redirects: int = 5
    user_agent_token: str = "pixelmill"
    user_agent: str = ""
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    local_root: str | None = None  # file:// URLs are read only from under this folder (folder inputs)


def opted_out(header_values: list[str], token: str, disallowed) -> str | None:
    """The X-Robots-Tag directive that forbids us this image, or None.

    A value is either `dir1, dir2` (for every crawler) or `bot: dir1, dir2` (for that bot only)."""
    disallowed = {d.lower() for d in disallowed}
    for value in header_values:
        bot, directives = None, value
        head, sep, rest = value.partition(":")
        if sep and head.strip().lower() not in VALUED_DIRECTIVES and " " not in head.strip():
            bot, directives = head.strip().lower(), rest
        if bot not in (None, "*", token.lower()):
            continue
        for directive in directives.split(","):
            if directive.strip().lower() in disallowed:
                return directive.strip().lower()
    return None


class Fetcher:
    """One per event loop: holds the connection pool, so connections to a host are reused across URLs."""

    def __init__(self, settings: FetchSettings, guard: AddressGuard, connections: int = 64):
        self.settings = settings
        self.guard = guard
        self.connections = connections
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Fetcher:
        connector = aiohttp.TCPConnector(
            limit=self.connections, resolver=GuardedResolver(self.guard), ttl_dns_cache=300, use_dns_cache=True
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": self.settings.user_agent},
            auto_decompress=True,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def fetch(self, url: str) -> Fetched:
        """Fetch with retries: transient failures are tried again after an exponential backoff."""
        attempt = 0
        while True:
            result = await self.fetch_once(url)
            if not result.transient or attempt >= self.settings.retries:
                return result
            await asyncio.sleep(self.settings.retry_backoff * 2**attempt)
            attempt += 1

    async def fetch_once(self, url: str) -> Fetched:
        s = self.settings
        try:
            async with asyncio.timeout(s.timeout):
                return await self._follow(url)
        except TimeoutError:
            return Fetched(reason="timeout", message=f"no complete answer within {s.timeout:g}s")
        except BlockedAddress as err:
            return Fetched(reason="blocked_address", message=str(err))
        except aiohttp.ClientConnectorDNSError as err:
            if isinstance(err.os_error, BlockedAddress):
                return Fetched(reason="blocked_address", message=str(err.os_error))
            return Fetched(reason="dns_error", message=str(err.os_error))
        except (aiohttp.InvalidURL, ValueError) as err:
            return Fetched(reason="invalid_url", message=f"invalid URL: {err}")
        except (aiohttp.ClientError, OSError) as err:
            return Fetched(reason="connection_error", message=f"{type(err).__name__}: {err}".strip(": "))

    async def _follow(self, url: str) -> Fetched:
        s = self.settings
        current = URL(url)
        seen = {str(current)}
        for _ in range(s.max_redirects + 1):
            if current.scheme == "file":
                return await self._read_file(current)
            if current.scheme not in ("http", "https") or not current.host:
                return Fetched(reason="invalid_url", message=f"unsupported URL {str(current)[:200]!r}")
            # The guard reads the host as spelled (yarl passes 0177.0.0.1 and 2130706433 through untouched) and
            # answers with its canonical address: connecting there means the check and the connection agree.
            host = self.guard.check_host(current.raw_host)
            if host != current.raw_host:
                current = current.with_host(host)
            async with self.session.get(current, allow_redirects=False) as response:
                if response.status in REDIRECTS and "Location" in response.headers:
                    current = current.join(URL(response.headers["Location"]))
                    if str(current) in seen:
                        return Fetched(reason="redirect_loop", message=f"redirect loop back to {current}")
                    seen.add(str(current))
                    continue
                if response.status != 200:
                    return Fetched(
                        reason=f"http_{response.status}", message=f"HTTP {response.status} {response.reason}"
                    )
                directive = opted_out(
                    response.headers.getall("X-Robots-Tag", []), s.user_agent_token, s.disallowed_header_directives
                )
                if directive:
                    return Fetched(reason="opted_out", message=f"X-Robots-Tag: {directive}")
                return await self._read_capped(response)
        return Fetched(reason="too_many_redirects", message=f"more than {s.max_redirects} redirects")

    async def _read_capped(self, response: aiohttp.ClientResponse) -> Fetched:
        cap = self.settings.max_bytes
        if response.content_length is not None and response.content_length > cap:
            response.close()  # drop the connection rather than drain a body we will not keep
            return Fetched(reason="too_large", message=f"Content-Length {response.content_length} > max_bytes {cap}")
        body = bytearray()
        async for chunk in response.content.iter_chunked(1 << 16):
            body += chunk
            if len(body) > cap:
                response.close()
                return Fetched(reason="too_large", message=f"body over max_bytes {cap}")
        return Fetched(data=bytes(body))

    async def _read_file(self, url: URL) -> Fetched:
        root = self.settings.local_root
        path = os.path.realpath(url.path)
        if root is None or os.path.commonpath([path, os.path.realpath(root)]) != os.path.realpath(root):
            return Fetched(reason="invalid_url", message="file:// URLs are read only from the input folder")
        try:
            size = os.path.getsize(path)
            if size > self.settings.max_bytes:
                return Fetched(
                    reason="too_large", message=f"file of {size} bytes > max_bytes {self.settings.max_bytes}"
                )
            return Fetched(data=await asyncio.to_thread(_read_bytes, path))
        except OSError as err:
            return Fetched(reason="file_error", message=f"{type(err).__name__}: {err}")


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
