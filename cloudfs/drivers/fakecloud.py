"""A fake cloud shared by several daemon processes: the fake driver's
servers kept as files in one directory (``cloudfs up --driver fake
--fake-cloud DIR``).

Nova's fake driver records state in Nova's database, which every API
worker and compute host sees; :class:`FakeCloudDriver` plays that role for
daemons on one machine (the cluster harness runs three in network
namespaces of their own): each server is ``DIR/servers/<id>.json``, written
whole to a temporary name and renamed over (rename(2) is atomic), removed
by unlink (after a tombstone ``DIR/deleted/<id>``, so that a concurrent
power change cannot bring it back), read by listing the directory.  No
lock is held across calls,
so a daemon that is paused (SIGSTOP) or killed in the middle of one call
never blocks another daemon's calls; like a real cloud's API, two creates
for one pid that race may both make a server (the reconciler's fencing
deletes the one it did not record: cloudfs.decisions.built).  Files that
do not parse are skipped (a crash between write and rename leaves only a
``.tmp-*`` file, which listings ignore).  Every daemon on one DIR has the
scope ``fake-cloud:<DIR>``, so any of them may take over a process whose
daemon went away.

The cloud's own settings are in ``DIR/settings.json`` (optional, read at
start): ``{"create_seconds": S}`` makes every create take S seconds between
its look for an existing server and the write of the new one, as a real
cloud's boot takes time (the cluster harness uses it to catch daemons
paused in the middle of a create).

Images, flavors and networks are the in-memory ones of
:class:`cloudfs.drivers.fake.FakeDriver`, per daemon.  Addresses are made
from the server id (unique in practice, not checked).  File access goes
through worker threads (trio.to_thread), one call's files at a time.
"""

from __future__ import annotations

import base64
import hashlib
import errno
import ipaddress
import json
import os
import time
import uuid
from pathlib import Path

import trio

from .base import META_PID, DriverError, NotFound, NotOurs, Server, ServerSpec, ServerStats
from .fake import FakeDriver

__all__ = ["FakeCloudDriver"]

#: The fields of a server file and their JSON types (others are skipped).
_FIELDS = {"name": str, "status": str, "host": str, "addresses": list, "message": str, "metadata": dict,
           "userdata": str, "secret": str, "networks": list, "born": (int, float)}


class FakeCloudDriver(FakeDriver):
    """The fake driver with its servers in ``directory`` (made if missing),
    shared by every daemon given the same directory.  ``calls`` records this
    process's mutating calls only."""

    def __init__(self, directory: str | os.PathLike, host: str = "fake-host"):
        self.dir = Path(directory).resolve()
        super().__init__(host=host, scope=f"fake-cloud:{self.dir}")
        (self.dir / "servers").mkdir(parents=True, exist_ok=True)
        (self.dir / "deleted").mkdir(exist_ok=True)
        self.create_seconds = 0.0
        try:
            settings = json.loads((self.dir / "settings.json").read_text())
        except FileNotFoundError:
            settings = {}
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.dir}/settings.json: {e}") from None
        cs = settings.get("create_seconds", 0.0) if isinstance(settings, dict) else None
        if not isinstance(cs, (int, float)) or isinstance(cs, bool) or not 0 <= cs <= 60:
            raise ValueError(f"{self.dir}/settings.json: create_seconds must be a number from 0 to 60")
        self.create_seconds = float(cs)

    async def snapshot(self, server_id: str) -> str:
        """EOPNOTSUPP: a snapshot in one daemon's memory is no use to the
        others sharing the directory."""
        raise DriverError("the fake cloud cannot copy a running server (fork live)", errno=errno.EOPNOTSUPP)

    migrates = False

    async def migrate(self, server_id: str, host: str) -> Server:
        """EOPNOTSUPP: the fake cloud has one host per daemon."""
        raise DriverError("the fake cloud cannot move a server to another host", errno=errno.EOPNOTSUPP)

    # ---- files ----------------------------------------------------------------

    def _path(self, sid: str) -> Path:
        if not sid or not all(c in "0123456789abcdef" for c in sid):
            raise NotFound(f"no server {sid}")
        return self.dir / "servers" / f"{sid}.json"

    def _read(self, sid: str) -> dict | None:
        try:
            doc = json.loads(self._path(sid).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("id") != sid:
            return None
        for key, kind in _FIELDS.items():
            if not isinstance(doc.get(key), kind):
                return None  # not a server this driver wrote: skipped
        return doc

    def _tombstone(self, sid: str) -> Path:
        return self.dir / "deleted" / sid

    def _write(self, doc: dict) -> None:
        path = self._path(doc["id"])
        tmp = path.with_name(f".tmp-{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(doc, sort_keys=True))
        os.replace(tmp, path)

    def _all(self) -> list[dict]:
        out = []
        for entry in os.scandir(self.dir / "servers"):
            if entry.name.endswith(".json") and not entry.name.startswith("."):
                doc = self._read(entry.name[:-5])
                if doc is not None:
                    out.append(doc)
        return sorted(out, key=lambda d: (d["born"], d["id"]))  # oldest first, as find promises

    @staticmethod
    def _server(doc: dict) -> Server:
        return Server(doc["id"], doc["name"], doc["status"], doc["host"], tuple(doc["addresses"]),
                      doc.get("message", ""))

    def _ours_doc(self, sid: str) -> dict:
        doc = self._read(sid)
        if doc is None:
            raise NotFound(f"no server {sid}")
        if not self.ours(doc["metadata"]):
            raise NotOurs(f"server {sid} is not deployment {self.deployment}'s")
        return doc

    def servers_on_disk(self) -> list[tuple[Server, dict[str, str]]]:
        """Every server of the cloud (all deployments) with its metadata,
        read now (blocking; for harnesses and tests)."""
        return [(self._server(d), dict(d["metadata"])) for d in self._all()]

    # ---- the driver -----------------------------------------------------------

    async def create(self, spec: ServerSpec) -> Server:
        for s in await self.find(spec.pid):
            if s.status != "exited":
                return s  # adopt: create is idempotent by (deployment, pid), as far as a listing tells
        self._maybe_fail("create")
        md, nets = self._checked(spec)
        sid = uuid.uuid4().hex
        addrs = []
        for n in nets:  # from the id: no counter to share between daemons
            base = ipaddress.ip_network(self.networks[n].cidr)
            span = max(1, base.num_addresses - 12)
            addrs.append(str(base.network_address + 10 + int(hashlib.sha256(sid.encode()).hexdigest(), 16) % span))
        await trio.sleep(self.create_seconds)
        doc = {"id": sid, "name": spec.name, "status": "running", "host": self.host, "addresses": addrs,
               "message": "", "metadata": md, "userdata": base64.b64encode(bytes(spec.userdata)).decode(),
               "secret": spec.secret, "networks": list(nets), "born": time.time()}
        await trio.to_thread.run_sync(self._write, doc)
        self.calls.append(("create", sid))
        return self._server(doc)

    async def find(self, pid: int) -> list[Server]:
        docs = await trio.to_thread.run_sync(self._all)
        return [self._server(d) for d in docs if self.ours(d["metadata"]) and d["metadata"].get(META_PID) == str(pid)]

    async def _change(self, server_id: str, method: str, **fields) -> Server:
        await trio.lowlevel.checkpoint()
        self._maybe_fail(method)

        def change() -> dict:
            doc = self._ours_doc(server_id)
            doc.update(fields)
            self._write(doc)
            # a delete between our read and our rename must win: it leaves a
            # tombstone before it unlinks, so a rename that came after the
            # unlink sees the tombstone here and undoes itself
            if self._tombstone(server_id).exists():
                self._path(server_id).unlink(missing_ok=True)
                raise NotFound(f"no server {server_id}")
            return doc

        doc = await trio.to_thread.run_sync(change)
        self.calls.append((method, server_id))
        return self._server(doc)

    async def rebuild(self, server_id, image, userdata, *, secret=""):
        if image not in self.images:
            await trio.lowlevel.checkpoint()
            raise NotFound(f"no image {image!r}")
        fields = {"status": "running", "message": "", "userdata": base64.b64encode(bytes(userdata)).decode()}
        if secret:
            fields["secret"] = secret
        return await self._change(server_id, "rebuild", **fields)

    async def delete(self, server_id):
        await trio.lowlevel.checkpoint()
        self._maybe_fail("delete")

        def delete() -> None:
            if self._read(server_id) is None:
                return
            self._ours_doc(server_id)
            self._tombstone(server_id).touch()  # before the unlink: see _change
            self._path(server_id).unlink(missing_ok=True)

        await trio.to_thread.run_sync(delete)
        self.calls.append(("delete", server_id))

    async def _power(self, server_id: str, status: str, method: str) -> Server:
        return await self._change(server_id, method, status=status)

    def exit(self, server_id: str, message: str = "exited") -> None:
        """Make a server end by itself (status ``exited``); blocking."""
        doc = self._ours_doc(server_id)
        doc.update(status="exited", message=message)
        self._write(doc)

    async def status(self, server_id):
        return self._server(await trio.to_thread.run_sync(self._ours_doc, server_id))

    async def stats(self, server_id):
        """As the fake driver's: counters that grow with the server's age."""
        doc = await trio.to_thread.run_sync(self._ours_doc, server_id)
        age = max(0.0, time.time() - float(doc.get("born", time.time())))
        return ServerStats(cpu_ns=int(age * 1e6), memory_bytes=256 << 20, block_read_bytes=0,
                           block_write_bytes=int(age) * 4096, block_read_ops=0, block_write_ops=int(age),
                           uptime_s=int(age))

    async def console(self, server_id, limit):
        doc = await trio.to_thread.run_sync(self._ours_doc, server_id)
        text = f"fake console of {doc['name']}\n".encode()
        return text[-limit:] if limit else b""

    async def delete_network(self, name):
        """As the fake driver's; a network is in use while a server of this
        cloud is on it."""
        docs = await trio.to_thread.run_sync(self._all)
        self.on_networks = {d["id"]: tuple(d.get("networks", ())) for d in docs}
        return await super().delete_network(name)
