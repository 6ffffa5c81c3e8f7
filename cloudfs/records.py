"""Process records in ZooKeeper: typed reads, the process tree, and
compare-and-set updates.

A record is read as a :class:`~cloudfs.process.Versioned` ``Process`` (the
value and its znode's data version) and written back with that version, so
two writers (two daemons, a ctl write and the reconciler) never lose each
other's changes: the loser reads again and retries.  Reads that serve files
(status, liveness, permission checks) use the store's watched cache
(:meth:`Records.cached`).  Data read back is parsed strictly
(:meth:`cloudfs.process.Process.from_json`): a malformed record is EIO, never
a traceback.

Errors are FsError: ENOENT (no such process), EIO (a corrupt record, or the
store's EIO), EAGAIN (the store's connection trouble).
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from ninep.errors import FsError

from .process import CorruptRecord, Process, Versioned
from .store import BadVersionError, NodeExistsError, NoNodeError, Store
from .znodes import Layout


def _checked(pid: int, rec: Process) -> Process:
    """``rec`` if it is the record of ``pid`` (a record under another pid's
    znode would make every write land on the wrong process)."""
    if rec.pid != pid:
        raise CorruptRecord(f"record of process {pid}", f"it says it is process {rec.pid}")
    return rec


def no_process(pid: int) -> FsError:
    """FsError(ENOENT) for a pid with no record."""
    return FsError(errno.ENOENT, f"no process {pid}")


async def make_process_dir(store: Store, path: str, pid: int) -> None:
    """Create ``path``, an empty znode directly under process ``pid``'s
    record that is made on first use (``note``, ``pipe``); no error if it
    exists; FsError(ENOENT) if the process does not."""
    try:
        await store.create(path, b"")
    except NodeExistsError:
        pass
    except NoNodeError:
        raise no_process(pid) from None


class Records:
    """The process records of one deployment (``layout``) on ``store``."""

    def __init__(self, store: Store, layout: Layout):
        self.store = store
        self.layout = layout

    async def get(self, pid: int) -> Versioned[Process] | None:
        """The record of ``pid`` with its version, or None if there is no such
        process.  Read from ZooKeeper (for compare-and-set)."""
        got = await self.store.get(self.layout.record(pid))
        if got is None:
            return None
        return Versioned(_checked(pid, Process.from_json(got[0])), got[1].version)

    async def require(self, pid: int) -> Versioned[Process]:
        """Like :meth:`get`; FsError(ENOENT) if there is no such process."""
        r = await self.get(pid)
        if r is None:
            raise no_process(pid)
        return r

    async def cached(self, pid: int) -> Process | None:
        """The record for reads that serve files (status, liveness, ancestry),
        parsed once per znode version in the store's watched cache
        (Store.cached_get); None if there is no such process.  Shared between
        callers: read it, never mutate it.  Not for compare-and-set: use
        :meth:`get`."""
        got = await self.store.cached_get(self.layout.record(pid), Process.from_json)
        return None if got is None else _checked(pid, got[0])

    async def exists(self, pid: int) -> bool:
        """Whether process ``pid`` is live (from the watched record cache)."""
        return await self.cached(pid) is not None

    async def is_descendant(self, pid: int, ancestor: int) -> bool:
        """True when ``pid`` is ``ancestor`` or a descendant of it (follows
        ``ppid`` links up to init; one cached record per level; a loop in
        corrupt records ends the walk).  False when ``pid`` does not exist."""
        seen: set[int] = set()
        while pid and pid not in seen:
            if pid == ancestor:
                return True
            seen.add(pid)
            r = await self.cached(pid)
            if r is None:
                return False
            pid = r.ppid
        return False

    async def chain(self, pid: int) -> list[Versioned[Process]]:
        """The records of ``pid`` and its ancestors up to init, ``pid`` first,
        read from ZooKeeper with their versions: a multi that depends on who
        the ancestors are checks each version (``t.check``), so it fails if
        any of them moved meanwhile (a reparented subtree).  Shorter when a
        record is missing; EIO for a loop in a corrupt tree."""
        out: list[Versioned[Process]] = []
        seen: set[int] = set()
        while pid:
            if pid in seen:
                raise FsError(errno.EIO, f"the process tree loops at process {pid}")
            seen.add(pid)
            got = await self.get(pid)
            if got is None:
                break
            out.append(got)
            pid = got.value.ppid
        return out

    async def pids(self) -> list[int]:
        """Live pids, ascending (one ZooKeeper get_children)."""
        return self.layout.pids(await self.store.children(self.layout.proc))

    async def kids(self, pid: int) -> list[int]:
        """Child pids of ``pid``, ascending; ENOENT if no such process."""
        names = await self.store.children(self.layout.kids(pid))
        if names is None:
            raise no_process(pid)
        return self.layout.pids(names)

    async def update(self, pid: int, change: Callable[[Process], Process | None], *,
                     work: bool = False) -> Versioned[Process]:
        """Apply ``change`` to the current record with compare-and-set,
        retrying on conflict; returns what was written.  ``change`` mutates
        the record (or returns a new one), or raises FsError to write
        nothing.  ``work`` also queues a reconciler work item in the same
        multi.  ENOENT if there is no such process."""
        L = self.layout
        while True:
            cur = await self.require(pid)
            rec = change(cur.value)
            rec = cur.value if rec is None else rec
            t = self.store.transaction()
            t.set_data(L.record(pid), rec.to_json(), cur.version)
            if work:
                t.create(L.pending_prefix(pid), b"", sequence=True)
            try:
                results = await self.store.commit(t)
            except BadVersionError:
                continue
            except NoNodeError:
                raise no_process(pid) from None
            return Versioned(rec, results[0].version)

    async def write(self, cur: Versioned[Process], rec: Process) -> Versioned[Process] | None:
        """Write ``rec`` over the record ``cur`` was read as, if it is still
        that version; the new version, or None if the record changed or is
        gone meanwhile (decide again)."""
        try:
            stat = await self.store.set(self.layout.record(rec.pid), rec.to_json(), cur.version)
        except (BadVersionError, NoNodeError):
            return None
        return Versioned(rec, stat.version)
