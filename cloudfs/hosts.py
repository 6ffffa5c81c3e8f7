"""``/hosts``: the live daemons of a deployment, one ephemeral znode each.

Every daemon keeps ``<root>/hosts/<name>`` while its ZooKeeper session
lives: JSON ``{"daemon", "driver", "scope", "since", "migrate"}``
(``migrate``: where the daemon takes VMs moved to it, a dial string, or
empty: cloudfs.moves).  ``name`` is the
host's name (``cloudfs up --host``, default the machine's hostname): what
people (and a later ``migrate HOST``) call the host.  The entry goes with
the daemon's session, so ``ls /hosts`` lists exactly the daemons that are up
(give or take the session timeout of one that died).  The VMs a host runs
are the processes its daemon owns (``owners/<pid>`` holds the daemon id,
cloudfs.reconciler).

A name is held by one session at a time.  A restarted daemon finds its old
entry until the dead session expires, and a second daemon given a name in
use finds the first's: :meth:`Hosts.run` keeps trying (watching the entry)
and logs that it waits, so the entry is its own once the other is gone.
After a lost session the entry is made again.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import socket
from dataclasses import dataclass

import trio

from ninep.errors import FsError

from .drivers.base import ComputeDriver
from .process import CorruptRecord, now_iso
from .store import NodeExistsError, NoNodeError, Store, Unreachable
from .znodes import Layout

log = logging.getLogger(__name__)

#: Seconds between attempts when ZooKeeper refuses the entry (not an outage).
RETRY_SECONDS = 5.0
#: Seconds the owners read for ``processes`` serve every reader.
OWNERS_TTL = 2.0

#: A host name: letters, digits, ``.``, ``_``, ``-``; at most 63 bytes (a DNS label's length).
HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def check_host_name(name: str) -> str:
    """``name`` if it is a valid host name, else ValueError."""
    if not HOST_NAME.fullmatch(name):
        raise ValueError(f"bad host name {name!r}: letters, digits, '.', '_', '-', at most 63, not starting "
                         "with a punctuation mark")
    return name


def default_host_name() -> str:
    """The machine's hostname, first label, if it is a valid host name
    (ValueError otherwise: give one with ``--host``)."""
    return check_host_name(socket.gethostname().split(".")[0])


@dataclass(frozen=True)
class Host:
    """One entry of ``/hosts``: ``name``; ``daemon`` its daemon's id;
    ``driver`` the compute driver's kind; ``scope`` its scope; ``since``
    ISO 8601 UTC; ``migrate`` the dial string where it takes moved VMs
    (``""``: it takes none)."""

    name: str
    daemon: str
    driver: str
    scope: str
    since: str
    migrate: str = ""

    def to_json(self) -> bytes:
        return json.dumps({"daemon": self.daemon, "driver": self.driver, "scope": self.scope,
                           "since": self.since, "migrate": self.migrate}).encode()

    @classmethod
    def from_json(cls, name: str, data: bytes) -> "Host":
        """CorruptRecord (EIO) for anything cloudfs would not write."""
        try:
            raw = json.loads(data)
        except ValueError:
            raise CorruptRecord(f"host entry {name!r}", "not JSON") from None
        if not isinstance(raw, dict) or not all(isinstance(raw.get(k), str)
                                                for k in ("daemon", "driver", "scope", "since")) \
                or not isinstance(raw.get("migrate", ""), str):
            raise CorruptRecord(f"host entry {name!r}", "fields of the wrong type")
        return cls(name, raw["daemon"], raw["driver"], raw["scope"], raw["since"], raw.get("migrate", ""))


class Hosts:
    """This daemon's entry (``name``) and the reading of everyone's."""

    def __init__(self, store: Store, layout: Layout, name: str, daemon_id: str, driver: ComputeDriver,
                 migrate: str = ""):
        self.store, self.layout = store, layout
        self.me = Host(check_host_name(name), daemon_id, driver.kind, driver.scope, now_iso(), migrate)
        self.registered = False
        self._owners_lock = trio.Lock()
        self._owners_map: dict[int, bytes] | None = None
        self._owners_at = 0.0

    def _path(self, name: str) -> str:
        return f"{self.layout.hosts}/{name}"

    async def _register(self) -> bool:
        """Make our entry; True if it is ours now."""
        path = self._path(self.me.name)
        try:
            await self.store.create(path, self.me.to_json(), ephemeral=True)
            return True
        except NodeExistsError:
            got = await self.store.get(path)
            cid = self.store.client.client_id  # None while the connection is down
            return got is not None and cid is not None and got[1].ephemeralOwner == cid[0]

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep our entry while this runs (until cancelled); started once a
        first attempt was made."""
        started = False
        warned = False
        while True:
            try:
                with self.store.watching(self.layout.hosts) as ev:
                    self.registered = await self._register()
                    if not self.registered and not warned:
                        log.warning("/hosts/%s is another session's (this daemon restarted before its old "
                                    "session expired, or another daemon has the name): waiting for it to go",
                                    self.me.name)
                        warned = True
                    if self.registered:
                        warned = False
                    names = await self.store.children(self.layout.hosts, watch=True)
                    if not started:
                        task_status.started()
                        started = True
                    if names is None:
                        raise NoNodeError()  # hosts/ removed by hand: no watch is armed
                    if not self.registered and self.me.name not in names:
                        continue  # freed before the watch was armed: its deletion fired nothing
                    await ev.wait()  # a host came or went, or the session came back
            except Unreachable:
                self.registered = False
                if not started:
                    task_status.started()
                    started = True
                await self.store.wait_connected()
                await trio.sleep(0.1)
            except Exception as e:  # refused (EACCES), hosts/ removed by hand, a bug: the entry is not worth the daemon
                self.registered = False
                if isinstance(e, (FsError, NoNodeError)):
                    log.warning("/hosts/%s: %s; trying again in %g s", self.me.name,
                                getattr(e, "message", None) or type(e).__name__, RETRY_SECONDS)
                else:
                    log.exception("/hosts/%s; trying again in %g s", self.me.name, RETRY_SECONDS)
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(RETRY_SECONDS)

    async def names(self) -> list[str]:
        """The names of the live hosts, sorted."""
        return sorted(n for n in await self.store.children(self.layout.hosts) or () if HOST_NAME.fullmatch(n))

    async def get(self, name: str) -> Host:
        """Host ``name``; ENOENT if no daemon has it."""
        if not HOST_NAME.fullmatch(name):
            raise FsError(errno.ENOENT, f"no host {name!r}")
        got = await self.store.get(self._path(name))
        if got is None:
            raise FsError(errno.ENOENT, f"no host {name!r}")
        return Host.from_json(name, got[0])

    async def processes(self, host: Host) -> list[int]:
        """The pids ``host``'s daemon owns (the VMs it runs), ascending.

        The owners are read at most once per OWNERS_TTL seconds for all
        readers (one listing and one read per owner znode, pipelined): a
        loop of ``cat /hosts/*`` costs ZooKeeper no more than that."""
        owners = await self._owners()
        return sorted(p for p, daemon in owners.items() if daemon == host.daemon.encode())

    async def _owners(self) -> dict[int, bytes]:
        async with self._owners_lock:
            if self._owners_map is None or trio.current_time() - self._owners_at >= OWNERS_TTL:
                L = self.layout
                pids = L.pids(await self.store.children(L.owners))
                got = await self.store.many("get_async", [(L.owner(p),) for p in pids])
                self._owners_map = {p: g[0] for p, g in zip(pids, got) if isinstance(g, tuple)}  # else: gone
                self._owners_at = trio.current_time()
            return self._owners_map

