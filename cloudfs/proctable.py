"""The process table in ZooKeeper: fork, exec, kill, stop, start, user-data,
env keys and wait records, as atomic ZooKeeper operations.

Every mutation of a record is a compare-and-set on the record's znode
version, retried on conflict; operations that need the compute backend also
create a ``pending`` znode in the same multi, which wakes the reconcilers.
The znode layout is in :mod:`cloudfs.znodes`; the semantics in
docs/namespace.md.  Errors are FsError: ENOENT (no such process), EINVAL
(bad argument, with a message), EPERM (not allowed on init), ESRCH (the
process is being killed), EFBIG (value too large), plus the store's
EAGAIN/EIO for connection trouble.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import trio

from ninep.errors import FsError

from .ctl import Command
from .drivers.base import META_DEPLOYMENT, META_PID, META_PPID, ComputeDriver
from .identity import new_secret
from .process import Process, WaitRecord, init_record
from .store import BadVersionError, NoNodeError, NodeExistsError, NotEmptyError, Store
from .znodes import ENV_VALUE_MAX, INIT_PID, USERDATA_MAX, Layout


def _enoent(pid: int) -> FsError:
    return FsError(errno.ENOENT, f"no process {pid}")


class ProcTable:
    """Process-table operations for one deployment (``layout``) on ``store``."""

    def __init__(self, store: Store, layout: Layout, driver: ComputeDriver):
        self.store = store
        self.layout = layout
        self.driver = driver

    def server_tags(self, rec: Process) -> dict[str, str]:
        """The metadata that marks ``rec``'s server as this deployment's
        (drivers.base META_*): written at create, searched by ``find``."""
        return {META_DEPLOYMENT: self.layout.root, META_PID: str(rec.pid), META_PPID: str(rec.ppid)}

    # -- setup ------------------------------------------------------------

    async def init_layout(self) -> None:
        """Create the deployment's znodes and init (pid 1) if missing.
        Atomic, so concurrent daemons agree; a no-op when they exist."""
        L = self.layout
        if await self.store.exists(L.nextpid) is not None:
            return
        await self.store.ensure_path(L.root)
        t = self.store.transaction()
        t.create(L.nextpid, b"2")
        t.create(L.proc, b"")
        t.create(L.pending, b"")
        t.create(L.owners, b"")
        paths = L.process_subtree(INIT_PID)
        t.create(paths[0], init_record().to_json())
        for p in paths[1:]:
            t.create(p, b"")
        try:
            await self.store.commit(t)
        except NodeExistsError:
            pass

    # -- records ----------------------------------------------------------

    async def record(self, pid: int) -> tuple[Process, int] | None:
        """``(record, znode version)`` or None if there is no such process."""
        got = await self.store.get(self.layout.record(pid))
        if got is None:
            return None
        return Process.from_json(got[0]), got[1].version

    async def cached_record(self, pid: int) -> Process | None:
        """The record for reads that serve files (status, liveness, ancestry),
        parsed once per znode version in the store's watched cache
        (Store.cached_get); None if there is no such process.  Shared between
        callers: read it, never mutate it.  Not for compare-and-set: use
        :meth:`record`."""
        got = await self.store.cached_get(self.layout.record(pid), Process.from_json)
        return None if got is None else got[0]

    async def require(self, pid: int) -> tuple[Process, int]:
        """Like :meth:`record`; FsError(ENOENT) if missing."""
        r = await self.record(pid)
        if r is None:
            raise _enoent(pid)
        return r

    async def is_descendant(self, pid: int, ancestor: int) -> bool:
        """True when ``pid`` is ``ancestor`` or a descendant of it (follows
        ``ppid`` links up to init; one cached record per level).  False when
        ``pid`` does not exist."""
        seen: set[int] = set()
        while pid and pid not in seen:
            if pid == ancestor:
                return True
            seen.add(pid)
            r = await self.cached_record(pid)
            if r is None:
                return False
            pid = r.ppid
        return False

    async def exists(self, pid: int) -> bool:
        """Whether process ``pid`` is live (from the watched record cache)."""
        return await self.cached_record(pid) is not None

    async def pids(self) -> list[int]:
        """Live pids, ascending (one ZooKeeper get_children)."""
        names = await self.store.children(self.layout.proc) or []
        return sorted(int(n) for n in names if n.isdigit())

    async def kids(self, pid: int) -> list[int]:
        """Child pids of ``pid``, ascending; ENOENT if no such process."""
        names = await self.store.children(self.layout.kids(pid))
        if names is None:
            raise _enoent(pid)
        return sorted(int(n) for n in names)

    async def update(self, pid: int, fn: Callable[[Process], None], *, work: bool = False) -> Process:
        """Apply ``fn`` (mutates the record or raises FsError) with
        compare-and-set, retrying on conflict.  ``work`` also queues a
        reconciler work item in the same multi.  ENOENT if no such process."""
        L = self.layout
        while True:
            rec, version = await self.require(pid)
            fn(rec)
            t = self.store.transaction()
            t.set_data(L.record(pid), rec.to_json(), version)
            if work:
                t.create(L.pending_prefix(pid), b"", sequence=True)
            try:
                await self.store.commit(t)
                return rec
            except BadVersionError:
                continue
            except NoNodeError:
                raise _enoent(pid) from None

    # -- ctl commands -----------------------------------------------------

    async def fork(self, ppid: int, name: str | None = None) -> int:
        """Fork ``ppid``; returns the child's pid once its znodes exist.

        A VM parent gives a child with the same image, flavor, networks and
        user-data, to be booted at once (state ``creating``); init gives an
        empty child in state ``new``.  Race-free pid allocation: the
        ``nextpid`` counter is set with the version read, in the same multi.
        """
        L = self.layout
        while True:
            parent_r, next_r, ud_r = await _gather(
                self.require(ppid), self.store.get(L.nextpid), self.store.get(L.userdata(ppid))
            )
            parent, pversion = parent_r
            if parent.desired == "killed":
                raise FsError(errno.ESRCH, f"process {ppid} is being killed")
            if next_r is None:
                raise FsError(errno.EIO, "deployment has no pid counter")
            pid = int(next_r[0])
            child = Process(pid=pid, ppid=ppid, name=name or (parent.name if parent.has_image else f"p{pid}"),
                            secret=new_secret())
            userdata = ud_r[0] if (ud_r is not None and parent.has_image) else b""
            if parent.has_image and ppid != INIT_PID:
                child.image, child.flavor, child.networks = parent.image, parent.flavor, list(parent.networks)
                child.state, child.desired, child.gen = "creating", "running", 1
            t = self.store.transaction()
            t.set_data(L.nextpid, str(pid + 1).encode(), next_r[1].version)
            t.check(L.record(ppid), pversion)
            t.create(L.record(pid), child.to_json())
            t.create(L.kids(pid), b"")
            t.create(L.userdata(pid), userdata)
            t.create(L.env(pid), b"")
            t.create(L.wait(pid), b"")
            t.create(L.kid(ppid, pid), b"")
            if child.desired == "running":
                t.create(L.pending_prefix(pid), b"", sequence=True)
            try:
                await self.store.commit(t)
                return pid
            except (BadVersionError, NodeExistsError):
                continue
            except NoNodeError:
                raise _enoent(ppid) from None

    async def exec(self, pid: int, cmd: Command) -> Process:
        """Run ``pid`` from ``cmd.image`` (boot if new, rebuild if it has a VM).

        EINVAL for an unknown image, flavor or network; EPERM on init.
        Flavor and networks default to the current ones, else the driver's first.
        """
        if pid == INIT_PID:
            raise FsError(errno.EPERM, "init cannot exec: fork a child and exec that")
        images = {i.name for i in await self.driver.list_images()}
        flavors = await self.driver.list_flavors()
        nets = [n.name for n in await self.driver.list_networks()]
        if cmd.image not in images:
            raise FsError(errno.EINVAL, f"exec: unknown image {cmd.image!r}; see /images")
        if cmd.flavor is not None and cmd.flavor not in flavors:
            raise FsError(errno.EINVAL, f"exec: unknown flavor {cmd.flavor!r}; known: {', '.join(flavors)}")
        for n in cmd.networks:
            if n not in nets:
                raise FsError(errno.EINVAL, f"exec: unknown network {n!r}; see /net")

        def change(rec: Process) -> None:
            if rec.desired == "killed":
                raise FsError(errno.ESRCH, f"process {pid} is being killed")
            rec.image = cmd.image
            rec.flavor = cmd.flavor or rec.flavor or (flavors[0] if flavors else None)
            if cmd.networks:
                rec.networks = list(cmd.networks)
            elif not rec.networks and nets:
                rec.networks = [nets[0]]
            if cmd.name:
                rec.name = cmd.name
            if not rec.secret:  # a record from before credentials existed
                rec.secret = new_secret()
            rec.gen += 1
            rec.desired = "running"
            rec.state = "creating"
            rec.error = ""

        return await self.update(pid, change, work=True)

    async def kill(self, pid: int) -> None:
        """Mark ``pid`` and all its descendants to be killed.

        Marks top-down (a marked process can no longer fork, so no child is
        missed); the reconcilers then end them children first, each leaving a
        wait record with its parent.  EPERM on init.
        """
        if pid == INIT_PID:
            raise FsError(errno.EPERM, "cannot kill init")

        def mark(rec: Process) -> None:
            rec.desired = "killed"

        await self.update(pid, mark, work=True)
        todo = [pid]
        while todo:
            p = todo.pop()
            try:
                kids = await self.kids(p)
            except FsError:
                continue
            for k in kids:
                try:
                    await self.update(k, mark, work=True)
                except FsError as e:
                    if e.errno != errno.ENOENT:
                        raise
                    continue
                todo.append(k)

    async def set_power(self, pid: int, desired: str) -> None:
        """``stop`` (desired ``stopped``) or ``start`` (``running``).
        EINVAL on a process without an image, EPERM on init."""
        verb = "stop" if desired == "stopped" else "start"
        if pid == INIT_PID:
            raise FsError(errno.EPERM, f"cannot {verb} init")

        def change(rec: Process) -> None:
            if rec.desired == "killed":
                raise FsError(errno.ESRCH, f"process {pid} is being killed")
            if not rec.has_image:
                raise FsError(errno.EINVAL, f"{verb}: process {pid} has no image; exec it first")
            rec.desired = desired

        await self.update(pid, change, work=True)

    # -- userdata -----------------------------------------------------------

    async def get_userdata(self, pid: int) -> bytes:
        got = await self.store.get(self.layout.userdata(pid))
        if got is None:
            raise _enoent(pid)
        return got[0]

    async def write_userdata(self, pid: int, offset: int, data: bytes) -> int:
        """Write at ``offset``: offset 0 replaces, a later offset splices into
        the current value (so a large write split by the kernel works).
        EFBIG above USERDATA_MAX bytes."""
        return await self._write_value(self.layout.userdata(pid), offset, data, USERDATA_MAX, "userdata", pid)

    async def _write_value(self, path: str, offset: int, data: bytes, limit: int, what: str, pid: int,
                           create: bool = False) -> int:
        while True:
            if offset == 0:
                new, version = bytes(data), -1
            else:
                got = await self.store.get(path)
                if got is None:
                    if not create:
                        raise _enoent(pid)
                    cur, version = b"", None
                else:
                    cur, version = got[0], got[1].version
                new = cur[:offset].ljust(offset, b"\0") + data
            if len(new) > limit:
                raise FsError(errno.EFBIG, f"{what} is limited to {limit} bytes")
            try:
                if version is None:
                    raise NoNodeError()
                await self.store.set(path, new, version)
                return len(data)
            except BadVersionError:
                continue
            except NoNodeError:
                if not create:
                    raise _enoent(pid) from None
                try:
                    await self.store.create(path, new)
                    return len(data)
                except NodeExistsError:
                    continue
                except NoNodeError:
                    raise _enoent(pid) from None

    # -- env ----------------------------------------------------------------

    async def env_keys(self, pid: int) -> list[str]:
        names = await self.store.children(self.layout.env(pid))
        if names is None:
            raise _enoent(pid)
        return sorted(names)

    async def env_get(self, pid: int, key: str) -> bytes | None:
        got = await self.store.get(self.layout.env_key(pid, key))
        return None if got is None else got[0]

    async def env_wait(self, pid: int, key: str, nonblocking: bool) -> bytes:
        """The value of ``key``, blocking (ZooKeeper watch) until it is set.
        EAGAIN when ``nonblocking`` and unset; ENOENT if there is no such
        process or it ends while the read waits."""
        try:
            return await self.store.wait_set(self.layout.env_key(pid, key), nonblocking,
                                             gone=self.layout.record(pid))
        except FsError as e:
            if e.errno == errno.EAGAIN and nonblocking:
                raise FsError(errno.EAGAIN, f"env key {key!r} of process {pid} is not set") from None
            if e.errno == errno.ENOENT:
                raise _enoent(pid) from None
            raise

    async def env_write(self, pid: int, key: str, offset: int, data: bytes) -> int:
        """Set (offset 0) or extend ``key``; creates it; EFBIG above ENV_VALUE_MAX."""
        return await self._write_value(self.layout.env_key(pid, key), offset, data, ENV_VALUE_MAX,
                                       "an env value", pid, create=True)

    async def env_unset(self, pid: int, key: str) -> None:
        """Remove ``key``; ENOENT if it is not set."""
        try:
            await self.store.delete(self.layout.env_key(pid, key))
        except NoNodeError:
            raise FsError(errno.ENOENT, f"env key {key!r} is not set") from None

    # -- wait ---------------------------------------------------------------

    async def wait_next(self, pid: int, nonblocking: bool) -> WaitRecord:
        """Consume the oldest wait record of ``pid``, blocking until one exists.

        Cancelling (a Tflush, an interrupted read) while it waits consumes
        nothing; once the delete is sent it is finished shielded and the
        record returned with no checkpoint after, so the caller's reply goes
        out (before Rflush, as flush(5) allows): never consumed and dropped."""
        path = self.layout.wait(pid)
        while True:
            try:
                names = await self.store.wait_children(path, nonblocking)
            except FsError as e:
                if e.errno == errno.ENOENT:
                    raise _enoent(pid) from None
                if e.errno == errno.EAGAIN and nonblocking:
                    raise FsError(errno.EAGAIN, f"no child of process {pid} has ended") from None
                raise
            for n in sorted(names):
                got = await self.store.get(f"{path}/{n}")
                if got is None:
                    continue
                try:
                    with trio.CancelScope(shield=True):  # bounded by the store's op_timeout
                        await self.store.delete(f"{path}/{n}", got[1].version)
                except (NoNodeError, BadVersionError):
                    continue
                return WaitRecord.from_json(got[0])

    # -- ending a process (reconciler) ---------------------------------------

    async def finalize(self, pid: int, state: str, message: str, reparent: bool = False) -> bool:
        """Remove an ended process: its znodes go, a wait record goes to the
        parent, and a killed parent gets a work item (children first).
        Returns False (nothing done) while it still has children, unless
        ``reparent``: then its children become init's (as Unix orphans do)."""
        L = self.layout
        while True:
            r = await self.record(pid)
            if r is None:
                return True
            rec, version = r
            kids, envs, waits, pend = await _gather(
                self.store.children(L.kids(pid)), self.store.children(L.env(pid)),
                self.store.children(L.wait(pid)), self.store.children(L.pending),
            )
            if kids and not reparent:
                return False
            parent = await self.record(rec.ppid)
            t = self.store.transaction()
            for k in kids or ():
                kr = await self.record(int(k))
                if kr is None:
                    continue
                krec, kversion = kr
                krec.ppid = INIT_PID
                t.set_data(L.record(krec.pid), krec.to_json(), kversion)
                t.delete(L.kid(pid, krec.pid))
                t.create(L.kid(INIT_PID, krec.pid), b"")
            for k in envs or ():
                t.delete(L.env_key(pid, k))
            for w in waits or ():
                t.delete(f"{L.wait(pid)}/{w}")
            for p in L.process_subtree(pid)[:0:-1]:
                t.delete(p)
            t.delete(L.record(pid), version)
            for p in pend or ():
                if p.startswith(f"{pid}-"):
                    t.delete(f"{L.pending}/{p}")
            if parent is not None:
                # the parent's kill may be recorded meanwhile: then this multi
                # must queue its work (children first), so check its version
                t.check(L.record(rec.ppid), parent[1])
                t.delete(L.kid(rec.ppid, pid))
                t.create(L.wait_prefix(rec.ppid), WaitRecord(pid, rec.name, state, message).to_json(),
                         sequence=True)
                if parent[0].desired == "killed":
                    t.create(L.pending_prefix(rec.ppid), b"", sequence=True)
            try:
                await self.store.commit(t)
                return True
            except (BadVersionError, NotEmptyError, NoNodeError, NodeExistsError):
                await trio.sleep(0)
                continue


async def _gather(*aws):
    """Await several coroutines concurrently; results in order."""
    results: list = [None] * len(aws)

    async def one(i, aw):
        results[i] = await aw

    try:
        async with trio.open_nursery() as n:
            for i, aw in enumerate(aws):
                n.start_soon(one, i, aw)
    except BaseExceptionGroup as eg:
        first: BaseException = eg
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return results
