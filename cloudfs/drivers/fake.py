"""The fake compute driver: records state, runs nothing (like Nova's fake
driver).  For namespace tests and scale benchmarks.

It offers images ``tiny`` and ``alpine``, flavors ``m1.tiny`` (default) and
``m1.small``, and the network ``user`` (10.0.0.0/24).  ``exit(id, msg)`` makes
a server end by itself.  ``calls`` records every mutating call as
``(method, server_id_or_name)`` and ``listings`` counts the calls of
``list_images``, ``list_flavors`` and ``list_networks``.  ``fail_next(method, msg)`` makes the next call of that method raise
DriverError(msg) (for error-state tests).  Instances share ``scope`` "fake"
unless given another (to stand for separate hosts, as QEMU drivers are).
``snapshot`` (``fork live``) works on running or stopped servers: the
child's server gets the parent's ``userdata`` and ``secret`` is its own;
``snapshots`` maps the ids not yet consumed to the parent's server id.
``migrate`` moves a server between ``compute_hosts`` (its host and
``<host>-2``), as Nova's live migration between compute hosts.
Servers of other deployments (made by another instance bound elsewhere, or
put into ``servers`` by a test) are left alone, as the interface requires.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import itertools
import uuid

import trio

from .base import (
    META_PID, ComputeDriver, DriverError, Image, Network, NotFound, NotOurs, Server, ServerSpec, ServerStats,
)


class FakeDriver(ComputeDriver):
    """An in-memory cloud.  Share one instance between daemons of one test."""

    kind = "fake"
    migrates = True

    def __init__(self, host: str = "fake-host", scope: str = "fake"):
        self.host = host
        self.scope = scope
        self.images = {
            "tiny": Image("img-tiny-0001", "tiny", "active", 16_338_944, "qcow2",
                          "ee1eca47dc88f4879d8a229cc70a07c6", "2026-01-01T00:00:00Z"),
            "alpine": Image("img-alpine-0002", "alpine", "active", 52_428_800, "qcow2",
                            "0b8f7a1c2d3e4f5061728394a5b6c7d8", "2026-01-02T00:00:00Z"),
        }
        self.flavors = ["m1.tiny", "m1.small"]
        self.networks: dict[str, Network] = {
            "user": Network("net-user-0001", "user", "10.0.0.0/24", "active"),
        }
        self.servers: dict[str, Server] = {}
        self.on_networks: dict[str, tuple[str, ...]] = {}  # server id → its networks' names
        self.userdata: dict[str, bytes] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        self.secrets: dict[str, str] = {}
        #: what each server "wrote" to its console (tests append to it)
        self.consoles: dict[str, bytes] = {}
        self._born: dict[str, float] = {}
        self.calls: list[tuple[str, str]] = []
        self.listings: collections.Counter[str] = collections.Counter()
        self._failures: dict[str, str] = {}
        self.snapshots: dict[str, str] = {}
        #: the hosts ``migrate`` moves servers between (Nova compute hosts)
        self.compute_hosts = [host, f"{host}-2"]
        #: when set to an Event, ``migrate`` waits for it (tests of a move in progress)
        self.hold_migrate: trio.Event | None = None
        self._addr = {n: itertools.count(10) for n in self.networks}
        self._subnet = itertools.count(1)

    def exit(self, server_id: str, message: str = "exited") -> None:
        """Make a server end by itself (status ``exited``), as a guest's
        poweroff would; the reconciler's resync notices it."""
        s = self._get(server_id)
        self.servers[server_id] = Server(s.id, s.name, "exited", s.host, s.addresses, message)

    def fail_next(self, method: str, message: str) -> None:
        """Make the next call of ``method`` fail with DriverError(message)."""
        self._failures[method] = message

    def _maybe_fail(self, method: str) -> None:
        msg = self._failures.pop(method, None)
        if msg is not None:
            raise DriverError(msg)

    async def create(self, spec: ServerSpec) -> Server:
        await trio.lowlevel.checkpoint()
        for s in await self.find(spec.pid):
            if s.status != "exited":
                return s  # adopt: create is idempotent by (deployment, pid)
        self._maybe_fail("create")
        md, nets = self._checked(spec)
        if spec.snapshot:
            if self.snapshots.pop(spec.snapshot, None) is None:
                raise DriverError(f"no snapshot {spec.snapshot!r} (fork live): it was used or discarded")
            self.calls.append(("restore", spec.snapshot))
        addrs = [str(ipaddress.ip_network(self.networks[n].cidr).network_address + next(self._addr[n]))
                 for n in nets]
        sid = uuid.uuid4().hex
        s = Server(sid, spec.name, "running", self.host, tuple(addrs))
        self.servers[sid] = s
        self.userdata[sid] = bytes(spec.userdata)
        self.metadata[sid] = md
        self.secrets[sid] = spec.secret
        self.on_networks[sid] = nets
        self.consoles[sid] = f"fake console of {spec.name}\n".encode()
        self._born[sid] = trio.current_time()
        self.calls.append(("create", sid))
        return s

    async def snapshot(self, server_id: str) -> str:
        """A snapshot id for ``fork live`` of a running or stopped server."""
        await trio.lowlevel.checkpoint()
        self._maybe_fail("snapshot")
        s = self._get(server_id)
        if s.status not in ("running", "stopped"):
            raise DriverError(f"server {server_id} is {s.status}: nothing to copy")
        sid = f"snap-{uuid.uuid4().hex[:12]}"
        self.snapshots[sid] = server_id
        self.calls.append(("snapshot", server_id))
        return sid

    async def discard_snapshot(self, snapshot_id: str) -> None:
        await trio.lowlevel.checkpoint()
        if self.snapshots.pop(snapshot_id, None) is not None:
            self.calls.append(("discard_snapshot", snapshot_id))

    async def migrate(self, server_id: str, host: str) -> Server:
        """Move a running or stopped server to ``host``, one of
        :attr:`compute_hosts` (EINVAL otherwise, or for its own host)."""
        if self.hold_migrate is not None:
            await self.hold_migrate.wait()
        await trio.lowlevel.checkpoint()
        self._maybe_fail("migrate")
        s = self._get(server_id)
        if host not in self.compute_hosts or host == s.host:
            raise DriverError(f"no other compute host {host!r}", errno=errno.EINVAL)
        if s.status not in ("running", "stopped"):
            raise DriverError(f"server {server_id} is {s.status}", errno=errno.EBUSY)
        self.servers[server_id] = moved = Server(s.id, s.name, s.status, host, s.addresses, s.message)
        self.calls.append(("migrate", server_id))
        return moved

    def _checked(self, spec: ServerSpec) -> tuple[dict[str, str], tuple[str, ...]]:
        """The metadata of a server for ``spec`` and its networks (the
        first network when it names none); NotFound for an unknown image,
        flavor or network."""
        if spec.image not in self.images:
            raise NotFound(f"no image {spec.image!r}")
        flavor = spec.flavor or self.flavors[0]
        if flavor not in self.flavors:
            raise NotFound(f"no flavor {flavor!r}")
        nets = tuple(spec.networks or (next(iter(self.networks)),))
        for n in nets:
            if n not in self.networks:
                raise NotFound(f"no network {n!r}")
        return self.metadata_for(spec), nets

    async def find(self, pid: int) -> list[Server]:
        await trio.lowlevel.checkpoint()
        return [self.servers[sid] for sid, md in self.metadata.items()
                if sid in self.servers and self.ours(md) and md.get(META_PID) == str(pid)]

    def _get(self, sid: str) -> Server:
        s = self.servers.get(sid)
        if s is None:
            raise NotFound(f"no server {sid}")
        if not self.ours(self.metadata.get(sid, {})):
            raise NotOurs(f"server {sid} is not deployment {self.deployment}'s")
        return s

    async def rebuild(self, server_id, image, userdata, *, secret=""):
        await trio.lowlevel.checkpoint()
        self._maybe_fail("rebuild")
        s = self._get(server_id)
        if secret:
            self.secrets[server_id] = secret
        if image not in self.images:
            raise NotFound(f"no image {image!r}")
        s = Server(s.id, s.name, "running", s.host, s.addresses)
        self.servers[server_id] = s
        self.userdata[server_id] = bytes(userdata)
        self.calls.append(("rebuild", server_id))
        return s

    async def delete(self, server_id):
        await trio.lowlevel.checkpoint()
        self._maybe_fail("delete")
        if server_id in self.servers:
            self._get(server_id)  # NotFound for another deployment's
        self.servers.pop(server_id, None)
        self.on_networks.pop(server_id, None)
        self.userdata.pop(server_id, None)
        self.metadata.pop(server_id, None)
        self.secrets.pop(server_id, None)
        self.calls.append(("delete", server_id))

    async def _power(self, server_id: str, status: str, method: str) -> Server:
        await trio.lowlevel.checkpoint()
        self._maybe_fail(method)
        s = self._get(server_id)
        s = Server(s.id, s.name, status, s.host, s.addresses)
        self.servers[server_id] = s
        self.calls.append((method, server_id))
        return s

    async def stop(self, server_id):
        return await self._power(server_id, "stopped", "stop")

    async def start(self, server_id):
        return await self._power(server_id, "running", "start")

    async def status(self, server_id):
        await trio.lowlevel.checkpoint()
        return self._get(server_id)

    async def stats(self, server_id):
        """Made-up counters that grow with the server's age (1 ms of CPU and
        4 KiB written per second); no memory use or network counters."""
        await trio.lowlevel.checkpoint()
        self._get(server_id)
        age = trio.current_time() - self._born.get(server_id, trio.current_time())
        return ServerStats(cpu_ns=int(age * 1e6), memory_bytes=256 << 20, block_read_bytes=0,
                           block_write_bytes=int(age) * 4096, block_read_ops=0, block_write_ops=int(age),
                           uptime_s=int(age))

    async def console(self, server_id, limit):
        await trio.lowlevel.checkpoint()
        self._get(server_id)
        return self.consoles.get(server_id, b"")[-limit:] if limit else b""

    async def list_images(self):
        await trio.lowlevel.checkpoint()
        self.listings["list_images"] += 1
        self._maybe_fail("list_images")
        return list(self.images.values())

    async def list_flavors(self):
        await trio.lowlevel.checkpoint()
        self.listings["list_flavors"] += 1
        self._maybe_fail("list_flavors")
        return list(self.flavors)

    async def list_networks(self):
        await trio.lowlevel.checkpoint()
        self.listings["list_networks"] += 1
        self._maybe_fail("list_networks")
        return list(self.networks.values())

    async def create_network(self, name, cidr=None):
        await trio.lowlevel.checkpoint()
        self._maybe_fail("create_network")
        if name in self.networks:
            raise DriverError(f"network {name!r} exists")
        if cidr is None:
            cidr = f"10.{next(self._subnet)}.0.0/24"
        try:
            ipaddress.ip_network(cidr)
        except ValueError:
            raise DriverError(f"bad cidr {cidr!r}") from None
        net = Network(f"net-{uuid.uuid4().hex[:12]}", name, cidr, "active")
        self.networks[name] = net
        self._addr[name] = itertools.count(10)
        self.calls.append(("create_network", name))
        return net

    async def delete_network(self, name):
        """As a real driver: NotFound if missing, EBUSY while a server is on it."""
        await trio.lowlevel.checkpoint()
        self._maybe_fail("delete_network")
        if name not in self.networks:
            raise NotFound(f"no network {name!r}")
        if any(name in nets for nets in self.on_networks.values()):
            raise DriverError(f"network {name!r} is in use", errno=errno.EBUSY)
        del self.networks[name]
        self.calls.append(("delete_network", name))
