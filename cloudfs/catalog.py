"""The compute driver's images, flavors and networks as file operations see
them: listings cached per daemon, and the one place where file operations
call the driver.

Every walk, ``stat`` and read of ``/images`` and ``/net``, and every
``exec`` check, is answered from a listing at most :data:`CATALOG_TTL`
seconds old; an older one is fetched again on use (one driver call per kind
for all concurrent users).  A name that is not in the listing (a ``stat`` of
a new Glance image, ``exec`` of an image just uploaded) fetches it again at
once, but at most once per :data:`MISS_INTERVAL` seconds per kind, so a
client asking for unknown names cannot make the daemon hammer the cloud.
``touch /net/<name>`` (:meth:`Catalog.create_network`) drops the networks
listing.  So a change made in the cloud behind cloudfs's back shows within
``CATALOG_TTL`` seconds, and at once when asked for by name.

Driver failures: every :class:`~cloudfs.drivers.base.DriverError` (and any
other exception a driver lets out: an SDK or QMP failure it did not wrap)
raised for a file operation is logged here in one line and reaches the
edges as an :class:`~ninep.errors.FsError` with the driver's message: EIO,
or EAGAIN when the driver timed out (FUSE answers the errno, 9P2000.u
Rerror carries the message too).  A failed listing is remembered for
:data:`MISS_INTERVAL` seconds, so an outage costs the cloud at most one
call per kind per interval, however many clients ask.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio

from ninep.errors import FsError
from ninep.limits import LogLimiter

from .drivers.base import ComputeDriver, DriverError, Image, Network, ServerStats

log = logging.getLogger(__name__)

#: Seconds a listing is served from memory (how stale ``ls /images`` may be).
CATALOG_TTL = 5.0
#: Seconds between two fetches of one kind caused by misses or after a failure.
MISS_INTERVAL = 1.0
#: Seconds a server's stats sample or console is shared by all readers, and
#: how many such answers are kept at most.
SAMPLE_TTL = 1.0
SAMPLES_MAX = 4096

T = TypeVar("T")


@dataclass
class _Listing(Generic[T]):
    """One kind's last listing: ``items`` and when it was fetched (trio
    clock), or the error the last fetch failed with."""

    items: list[T] | None = None
    fetched: float = float("-inf")
    failed: FsError | None = None


class Catalog:
    """Images, flavors and networks of ``driver`` for one daemon.

    ``ttl`` seconds a listing is trusted (:data:`CATALOG_TTL`),
    ``miss_interval`` seconds between refetches on misses and failures
    (:data:`MISS_INTERVAL`).  Errors: FsError(ENOENT) for an unknown name,
    the driver's error (EIO/EAGAIN with its message) when a fetch fails."""

    def __init__(self, driver: ComputeDriver, ttl: float = CATALOG_TTL, miss_interval: float = MISS_INTERVAL):
        self.driver = driver
        self.ttl = ttl
        self.miss_interval = miss_interval
        self._lists: dict[str, _Listing] = {k: _Listing() for k in ("images", "flavors", "networks")}
        self._locks = {k: trio.Lock() for k in self._lists}
        # bumped when a kind's listing is dropped: a fetch that began before
        # does not store what it got (it may predate the change)
        self._gens = {k: 0 for k in self._lists}
        self._samples: dict[tuple, tuple[float, object, FsError | None]] = {}
        self._sample_locks: dict[tuple, trio.Lock] = {}
        self._warnings = LogLimiter(burst=10, interval=10.0)
        self._fetchers = {"images": "list_images", "flavors": "list_flavors", "networks": "list_networks"}

    # -- listings ---------------------------------------------------------

    async def images(self) -> list[Image]:
        """The images, at most ``ttl`` seconds old."""
        return await self._get("images")

    async def flavors(self) -> list[str]:
        """Flavor names; the first is the default."""
        return await self._get("flavors")

    async def networks(self) -> list[Network]:
        """The networks; the first is the default."""
        return await self._get("networks")

    async def image(self, name: str) -> Image:
        """The image called ``name``; FsError(ENOENT) if there is none."""
        return await self._find("images", name, lambda i: i.name, f"no image {name!r}")

    async def flavor(self, name: str) -> str:
        """``name`` if it is a flavor; FsError(ENOENT) if not."""
        return await self._find("flavors", name, lambda f: f, f"no flavor {name!r}")

    async def network(self, name: str) -> Network:
        """The network called ``name``; FsError(ENOENT) if there is none."""
        return await self._find("networks", name, lambda n: n.name, f"no network {name!r}")

    async def create_network(self, name: str) -> Network:
        """Ask the driver for network ``name`` (it picks the cidr).
        FsError(EEXIST) if it exists, the driver's error if it fails."""
        try:
            await self.network(name)
        except FsError as e:
            if e.errno != errno.ENOENT:
                raise
        else:
            raise FsError(errno.EEXIST, f"network {name!r} exists")
        try:
            return await self._call(f"create network {name!r}", lambda: self.driver.create_network(name))
        except DriverError as e:
            raise DriverError(f"cannot create network {name!r}: {e.message}", errno=e.errno) from None
        finally:
            self.forget("networks")

    async def delete_network(self, name: str) -> None:
        """Ask the driver to delete network ``name`` (``rm /net/<name>``).
        FsError: ENOENT if there is none, EBUSY while a server is on it,
        the driver's error otherwise."""
        await self.network(name)
        try:
            await self._call(f"delete network {name!r}", lambda: self.driver.delete_network(name))
        except DriverError as e:
            raise DriverError(f"cannot delete network {name!r}: {e.message}", errno=e.errno) from None
        finally:
            self.forget("networks")

    def forget(self, kind: str) -> None:
        """Drop ``kind``'s listing (``images``, ``flavors``, ``networks``):
        the next use fetches it, and a fetch under way is not kept."""
        self._gens[kind] += 1
        self._lists[kind] = _Listing()

    # -- servers -------------------------------------------------------------

    async def stats(self, server_id: str) -> ServerStats:
        """One sample of the server's counters, at most SAMPLE_TTL seconds
        old (however many clients read ``stats``, the driver is asked once
        per interval per server); all unknown if it is gone."""
        async def fetch() -> ServerStats:
            try:
                got = await self._call(f"stats of {server_id}", lambda: self.driver.stats(server_id))
            except FsError as e:
                if e.errno == errno.ENOENT:
                    return ServerStats()
                raise
            if not isinstance(got, ServerStats):
                raise DriverError(f"stats of {server_id}: the driver answered {type(got).__name__}")
            return got

        return await self._sampled(("stats", server_id), fetch)

    async def console(self, server_id: str, limit: int) -> bytes:
        """The last ``limit`` bytes of the server's console, at most
        SAMPLE_TTL seconds old (one driver call per interval per server);
        empty if it is gone."""
        async def fetch() -> bytes:
            try:
                got = await self._call(f"console of {server_id}", lambda: self.driver.console(server_id, limit))
            except FsError as e:
                if e.errno == errno.ENOENT:
                    return b""
                raise
            if not isinstance(got, (bytes, bytearray)):
                raise DriverError(f"console of {server_id}: the driver answered {type(got).__name__}")
            return bytes(got[-limit:]) if limit else b""

        return await self._sampled(("console", server_id, limit), fetch)

    async def _sampled(self, key: tuple, fetch: Callable[[], Awaitable[T]]) -> T:
        """``fetch()``'s answer (or failure), shared for SAMPLE_TTL seconds
        and by everyone who asks while it is being fetched; the table of
        answers is dropped whole when it passes SAMPLES_MAX entries."""
        lock = self._sample_locks.get(key)
        if lock is None:
            lock = self._sample_locks[key] = trio.Lock()
        try:
            async with lock:  # concurrent askers wait for the one fetch
                now = trio.current_time()
                hit = self._samples.get(key)
                if hit is None or now - hit[0] >= SAMPLE_TTL:
                    try:
                        hit = (now, await fetch(), None)
                    except FsError as e:
                        hit = (now, None, e)
                    if len(self._samples) >= SAMPLES_MAX:
                        self._samples.clear()
                    self._samples[key] = hit
        finally:
            if not lock.statistics().tasks_waiting and self._sample_locks.get(key) is lock:
                del self._sample_locks[key]
        if hit[2] is not None:
            raise FsError(hit[2].errno, hit[2].message)
        return hit[1]

    # -- internals ----------------------------------------------------------

    async def _get(self, kind: str, since: float | None = None) -> list:
        """The listing of ``kind``, fetched again if it is older than the
        ttl or was fetched before ``since``."""
        now = trio.current_time()
        got = self._lists[kind]
        if not self._stale(got, now, since):
            return self._answer(got)
        async with self._locks[kind]:  # concurrent users share one fetch
            got = self._lists[kind]
            if self._stale(got, now, since):
                got = await self._fetch(kind)
        return self._answer(got)

    def _stale(self, got: _Listing, now: float, since: float | None) -> bool:
        if got.failed is not None:
            return now - got.fetched >= self.miss_interval
        return now - got.fetched >= self.ttl or (since is not None and got.fetched < since)

    @staticmethod
    def _answer(got: _Listing) -> list:
        if got.failed is not None:  # a fresh exception each time: raising one adds the caller's frames to it
            raise DriverError(got.failed.message, errno=got.failed.errno)
        return got.items

    async def _fetch(self, kind: str) -> _Listing:
        gen = self._gens[kind]
        listing = _Listing(fetched=trio.current_time())
        try:
            items = await self._call(f"list {kind}", getattr(self.driver, self._fetchers[kind]))
            if not isinstance(items, list):
                raise DriverError(f"list {kind}: the driver answered {type(items).__name__}")
            listing.items = items
        except FsError as e:
            listing.failed = e if e.errno != errno.ENOENT else DriverError(e.message)
        if self._gens[kind] == gen:
            self._lists[kind] = listing
        return listing

    async def _find(self, kind: str, name: str, key: Callable, missing: str):
        for attempt in range(2):
            items = await self._get(kind)
            for item in items:
                if key(item) == name:
                    return item
            # a miss: fetch again unless the listing is already that fresh
            got = self._lists[kind]
            if attempt or trio.current_time() - got.fetched < self.miss_interval:
                break
            await self._get(kind, since=got.fetched + 1e-9)
        raise FsError(errno.ENOENT, missing)

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one driver call for a file operation: its failure is logged
        once, in one line, and raised as an FsError with its message."""
        try:
            return await fn()
        except DriverError as e:
            self._warnings.log(log, logging.WARNING, "compute driver: %s: %s", what, e.message)
            raise
        except Exception as e:  # an SDK or QMP failure the driver did not wrap
            self._warnings.log(log, logging.WARNING, "compute driver: %s: %s: %s", what, type(e).__name__, e)
            raise DriverError(f"{what}: {type(e).__name__}: {e}") from e
