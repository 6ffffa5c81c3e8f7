"""The ctl commands that change the process table: fork, exec, kill, stop
and start, each one atomic ZooKeeper write (docs/namespace.md, ctl).

Every change of a record is a compare-and-set (cloudfs.records); commands
that need the compute backend queue a ``pending`` work item in the same
multi, which wakes the reconcilers.  ``exec`` checks its image, flavor and
networks against the daemon's catalog (cloudfs.catalog), never the driver
directly.  Errors are FsError: ENOENT (no such process), EINVAL (bad
argument, with a message), EPERM (not allowed on init), ESRCH (the process
is being killed), plus the store's EAGAIN/EIO and the catalog's errors.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping

import trio

from ninep.errors import FsError

from .catalog import Catalog
from .ctl import Command
from .gather import gather
from .identity import new_secret
from .process import Desired, Process, State
from .quotas import DEFAULT_LIMITS, Quotas, charge_fork, child_quota
from .records import Records, no_process
from .store import BadVersionError, NodeExistsError, NoNodeError, Store
from .znodes import INIT_PID, Layout


#: Attempts at a fork's multi before EAGAIN (each failure is another
#: daemon's fork or change in the parent's ancestry).
MAX_ATTEMPTS = 200


def _being_killed(pid: int) -> FsError:
    return FsError(errno.ESRCH, f"process {pid} is being killed")


class Lifecycle:
    """fork, exec, kill, stop and start on the deployment's process table.
    ``limits`` are the quota limits new processes get (cloudfs.quotas)."""

    def __init__(self, store: Store, layout: Layout, records: Records, catalog: Catalog, quotas: Quotas,
                 limits: Mapping[str, int] = DEFAULT_LIMITS):
        self.store = store
        self.layout = layout
        self.records = records
        self.catalog = catalog
        self.quotas = quotas
        self.limits = dict(limits)

    async def fork(self, ppid: int, name: str | None = None, *, snapshot: str = "", scope: str = "") -> int:
        """Fork ``ppid``; returns the child's pid once its znodes exist.

        A VM parent gives a child with the same image, flavor, networks and
        user-data, to be booted at once (state ``creating``); init gives an
        empty child in state ``new``.  ``snapshot`` (``fork live``): the
        driver's snapshot of the parent's VM, made by a driver of ``scope``,
        which the child is restored from (only a daemon of that scope
        creates it); EINVAL if the parent has no VM.  Race-free pid allocation: the
        ``nextpid`` counter is set with the version read, in the same multi.
        Every ancestor's ``descendants`` count goes up in that multi too
        (EAGAIN beyond a limit, cloudfs.quotas).
        """
        L = self.layout
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                await trio.sleep(min(0.05, 0.001 * attempt))  # contention: back off a little
            records = await self.records.chain(ppid)
            if not records or records[0].value.pid != ppid:
                raise no_process(ppid)
            chain = [r.value.pid for r in records]
            counter, ud, *quotas = await gather(
                self.store.get(L.nextpid), self.store.get(L.userdata(ppid)), *(self.quotas.get(a) for a in chain))
            parent = records[0]
            counted = [(a, q) for a, q in zip(chain, quotas) if q is not None]
            charged = charge_fork([(a, q.value) for a, q in counted])
            p = parent.value
            if p.desired is Desired.KILLED:
                raise _being_killed(ppid)
            pid = L.pid_name(counter[0].decode("ascii", "replace")) if counter is not None else None
            if pid is None or pid < 2:
                raise FsError(errno.EIO, "the deployment's pid counter is missing or corrupt")
            boots = p.has_image and ppid != INIT_PID
            if snapshot and not boots:
                raise FsError(errno.EINVAL, f"fork live: process {ppid} has no VM to copy")
            userdata = ud[0] if (ud is not None and p.has_image) else b""
            child = Process(pid=pid, ppid=ppid, name=name or (p.name if p.has_image else f"p{pid}"),
                            secret=new_secret())
            if boots:
                child.image, child.flavor, child.networks = p.image, p.flavor, list(p.networks)
                child.state, child.desired, child.gen = State.CREATING, Desired.RUNNING, 1
                child.snapshot, child.scope = snapshot, (scope if snapshot else "")
            t = self.store.transaction()
            t.set_data(L.nextpid, str(pid + 1).encode(), counter[1].version)
            for r in records:  # the parent, and the ancestors counted below, are still who they were
                t.check(L.record(r.value.pid), r.version)
            t.create(L.record(pid), child.to_json())
            t.create(L.kids(pid), b"")
            t.create(L.userdata(pid), userdata)
            t.create(L.env(pid), b"")
            t.create(L.wait(pid), b"")
            parent_quota = charged[0] if counted and counted[0][0] == ppid else None
            t.create(L.quota(pid), child_quota(parent_quota, self.limits).to_json())
            for (a, q), new in zip(counted, charged):
                t.set_data(L.quota(a), new.to_json(), q.version)
            t.create(L.kid(ppid, pid), b"")
            if boots:
                t.create(L.pending_prefix(pid), b"", sequence=True)
            try:
                await self.store.commit(t)
                return pid
            except BadVersionError:
                continue  # another fork took the pid, or an ancestor changed: read again
            except NodeExistsError:
                # the counter is behind existing znodes: retrying cannot help
                raise FsError(errno.EIO, f"the deployment's pid counter ({pid}) names an existing process") from None
            except NoNodeError:
                if await self.records.get(ppid) is None:
                    raise no_process(ppid) from None
                continue  # an ancestor ended meanwhile (the tree changed): read it again
        raise FsError(errno.EAGAIN, f"fork of {ppid}: the tree kept changing ({MAX_ATTEMPTS} attempts); try again")

    async def exec(self, pid: int, cmd: Command) -> Process:
        """Run ``pid`` from ``cmd.image`` (boot if new, rebuild if it has a VM).

        EINVAL for an unknown image, flavor or network; EPERM on init.
        Flavor and networks default to the current ones, else the driver's first.
        (A rebuild gives the process a new secret once it succeeds:
        cloudfs.reconciler.)
        """
        if pid == INIT_PID:
            raise FsError(errno.EPERM, "init cannot exec: fork a child and exec that")
        await _known(self.catalog.image(cmd.image), f"exec: unknown image {cmd.image!r}; see /images")
        flavors = await self.catalog.flavors()
        if cmd.flavor is not None:
            await _known(self.catalog.flavor(cmd.flavor),
                         f"exec: unknown flavor {cmd.flavor!r}; known: {', '.join(flavors)}")
        for n in cmd.networks:
            await _known(self.catalog.network(n), f"exec: unknown network {n!r}; see /net")
        nets = await self.catalog.networks()

        def change(rec: Process) -> None:
            if rec.desired is Desired.KILLED:
                raise _being_killed(pid)
            rec.image = cmd.image
            rec.flavor = cmd.flavor or rec.flavor or (flavors[0] if flavors else None)
            if cmd.networks:
                rec.networks = list(cmd.networks)
            elif not rec.networks and nets:
                rec.networks = [nets[0].name]
            if cmd.name:
                rec.name = cmd.name
            if not rec.secret:  # a record from before credentials existed
                rec.secret = new_secret()
            rec.gen += 1
            rec.desired = Desired.RUNNING
            rec.state = State.CREATING
            rec.error = ""
            if rec.snapshot:  # a fork live child not built yet boots the image instead (its copy is swept later)
                rec.snapshot = ""
                if rec.vm is None:
                    rec.scope = ""

        return (await self.records.update(pid, change, work=True)).value

    async def kill(self, pid: int) -> None:
        """Mark ``pid`` and all its descendants to be killed.

        Marks top-down (a marked process can no longer fork, so no child is
        missed); the reconcilers then end them children first, each leaving a
        wait record with its parent.  EPERM on init.
        """
        if pid == INIT_PID:
            raise FsError(errno.EPERM, "cannot kill init")

        def mark(rec: Process) -> None:
            rec.desired = Desired.KILLED

        await self.records.update(pid, mark, work=True)
        todo, seen = [pid], {pid}
        while todo:
            p = todo.pop()
            try:
                kids = await self.records.kids(p)
            except FsError as e:
                if e.errno != errno.ENOENT:
                    raise
                continue
            for k in kids:
                if k in seen:  # a corrupt tree with a loop
                    continue
                seen.add(k)
                try:
                    await self.records.update(k, mark, work=True)
                except FsError as e:
                    if e.errno != errno.ENOENT:
                        raise
                    continue
                todo.append(k)

    async def set_power(self, pid: int, desired: Desired) -> None:
        """``stop`` (Desired.STOPPED) or ``start`` (Desired.RUNNING).
        EINVAL on a process without an image, EPERM on init."""
        verb = "stop" if desired is Desired.STOPPED else "start"
        if pid == INIT_PID:
            raise FsError(errno.EPERM, f"cannot {verb} init")

        def change(rec: Process) -> None:
            if rec.desired is Desired.KILLED:
                raise _being_killed(pid)
            if not rec.has_image:
                raise FsError(errno.EINVAL, f"{verb}: process {pid} has no image; exec it first")
            rec.desired = desired

        await self.records.update(pid, change, work=True)


async def _known(lookup, message: str) -> None:
    """Await a catalog lookup; its ENOENT becomes EINVAL with ``message``."""
    try:
        await lookup
    except FsError as e:
        if e.errno == errno.ENOENT:
            raise FsError(errno.EINVAL, message) from None
        raise
