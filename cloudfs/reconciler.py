"""The reconciler: brings the compute backend to the state recorded in
ZooKeeper and writes the observed state back.  *What* to do is decided by
the pure table in :mod:`cloudfs.decisions`; this module *does* it: it finds
work, holds ownership, calls the driver, and makes every compare-and-set
write of the reconciler.

Work items are znodes ``<root>/pending/<pid>-<seq>`` created (in the same
multi) by every ctl command that needs the backend.  Each daemon runs one
:class:`Reconciler`; it watches ``pending`` and ``owners``.  For a pid with
work, a daemon acts only if it owns the pid: it holds the ephemeral znode
``owners/<pid>`` (first come; kept for the process's life, so exactly one
daemon acts per process).  When an owner's session ends its ephemeral znode
vanishes, the ``owners`` watch fires, and another daemon takes the work over
if its driver reaches the process's server (same driver ``scope``: any
daemon on one OpenStack project, but a QEMU VM only the daemon of its host
and state dir, whose work waits for that daemon to come back).

Converging one pid (:meth:`Reconciler.converge`) repeats, at most
:data:`MAX_STEPS` times: read the record, look at what
:func:`cloudfs.decisions.look` names (children, the server's status, the
servers tagged with the pid), :func:`cloudfs.decisions.decide`, and carry out
the one action.  Work items seen before are deleted once it converged;
ones created meanwhile make it go round again.  A driver failure while
looking, and any unexpected error, leave the work items: the rescan every
``resync_interval`` seconds tries again.

Every ``resync_interval`` seconds it also converges every process it owns
(Nova's power-state sync: this polls the *driver*), after taking over the
VM processes no daemon owns (theirs restarted or lost its session).

Fencing: a create that finishes after another daemon recorded a server for
the pid (this daemon's session expired mid-boot and the pid was taken over),
or after the process was killed or ended, deletes its own server instead of
recording it (cloudfs.decisions.built raises Superseded).  When the record
write itself fails (the session is gone by then), the server is kept in
``unconfirmed`` and settled on reconnection and at each resync; a daemon
killed before that leaves a duplicate, which goes when the process ends
(an end deletes every server of the daemon's scope tagged with the pid).
"""

from __future__ import annotations

import contextlib
import errno
import logging

import trio

from ninep.errors import FsError

from . import decisions as d
from .drivers.base import ComputeDriver, DriverError, NotFound, NotOurs, Server, ServerSpec
from .exits import Exits
from .identity import new_secret
from .procdata import ProcData
from .process import CorruptRecord, Desired, Process, State, Versioned, now_iso
from .records import Records
from .store import BadVersionError, NodeExistsError, NoNodeError, Store
from .znodes import INIT_PID, Layout

log = logging.getLogger(__name__)

#: Actions one converge carries out at most before it leaves the rest to
#: the next round (a create, a stop and a note are three).
MAX_STEPS = 6


class Owners:
    """The ``owners/<pid>`` ephemeral znodes this daemon holds: whoever holds
    one is the only daemon acting on that pid's server."""

    def __init__(self, store: Store, layout: Layout, daemon_id: str):
        self.store = store
        self.layout = layout
        self.daemon_id = daemon_id
        self.owned: set[int] = set()

    async def take(self, pid: int) -> bool:
        """Own ``pid`` (first come); True if this daemon owns it now."""
        if pid in self.owned:
            return True
        path = self.layout.owner(pid)
        try:
            await self.store.create(path, self.daemon_id.encode(), ephemeral=True)
        except NodeExistsError:
            got = await self.store.get(path)
            if got is None or got[0] != self.daemon_id.encode() \
                    or got[1].ephemeralOwner != self.store.client.client_id[0]:
                return False
        except NoNodeError:
            return False
        self.owned.add(pid)
        return True

    async def release(self, pid: int) -> None:
        """Give ``pid`` up (it ended, or its server is beyond our reach).
        Only this session's own owner znode is deleted: after a lost session
        another daemon's may be there."""
        if pid not in self.owned:
            return
        self.owned.discard(pid)
        path = self.layout.owner(pid)
        got = await self.store.get(path)
        if got is None or got[1].ephemeralOwner != self.store.client.client_id[0]:
            return
        try:
            await self.store.delete(path, got[1].version)
        except (NoNodeError, BadVersionError):
            pass

    def forget(self) -> None:
        """The session was lost: its ephemeral znodes are gone."""
        self.owned.clear()


class Reconciler:
    """One daemon's reconciler.  ``daemon_id`` is this daemon's unique name
    (stored in the owner znodes); ``resync_interval`` seconds between
    resyncs and rescans of the work items (None: no resync, rescan every
    10 s).  Run :meth:`run` in a nursery."""

    def __init__(self, store: Store, layout: Layout, records: Records, data: ProcData, exits: Exits,
                 driver: ComputeDriver, daemon_id: str, resync_interval: float | None = 10.0):
        self.store = store
        self.layout = layout
        self.records = records
        self.data = data
        self.exits = exits
        self.driver = driver
        self.daemon_id = daemon_id
        self.owners = Owners(store, layout, daemon_id)
        self.active: set[int] = set()
        self.dirty: set[int] = set()
        self.resync_interval = resync_interval
        #: pid → server this daemon made whose record write failed (ZooKeeper
        #: trouble: it may or may not be recorded); see _settle_unconfirmed
        self.unconfirmed: dict[int, str] = {}
        #: carries out moves of QEMU VMs between daemons (cloudfs.moves.Moves;
        #: None: moves are the driver's own live migration)
        self.mover = None
        self._settling = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self.store.on_reconnect.append(self._reconnected)

    @property
    def owned(self) -> set[int]:
        """The pids this daemon owns now."""
        return self.owners.owned

    def _reconnected(self, lost: bool) -> None:
        if lost:
            self.owners.forget()
        if self.unconfirmed and self._nursery is not None:
            self._nursery.start_soon(self._settle_now)

    async def _settle_now(self) -> None:
        try:
            await self._settle_unconfirmed()
        except FsError as e:  # the next resync tries again
            log.info("settling unconfirmed servers: %s", e)
        except Exception:  # a driver bug must not stop the daemon
            log.exception("settling unconfirmed servers")

    # -- finding work ---------------------------------------------------------

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Watch for work forever (until cancelled)."""
        L = self.layout
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.resync_interval:
                nursery.start_soon(self._resync_loop)
            task_status.started()
            while True:
                try:
                    with self.store.watching(L.pending, L.owners) as ev:
                        names = await self.store.children(L.pending, watch=True) or []
                        await self.store.children(L.owners, watch=True)
                        for pid in sorted({p for p in map(L.pending_pid, names) if p is not None}):
                            self._kick(pid)
                        # a watch, or every resync interval a rescan: work
                        # left by a failed attempt is picked up again
                        with trio.move_on_after(self.resync_interval or 10.0):
                            await ev.wait()
                except FsError as e:
                    log.info("reconciler waiting for ZooKeeper: %s", e)
                    with trio.move_on_after(5):
                        await self.store.wait_connected()
                    await trio.sleep(0.05)

    def _kick(self, pid: int) -> None:
        """Make sure a task works on ``pid``'s items (again)."""
        if pid in self.active:
            self.dirty.add(pid)
        elif self._nursery is not None:
            self.active.add(pid)
            self._nursery.start_soon(self._work, pid)

    async def _items(self, pid: int) -> list[str]:
        names = await self.store.children(self.layout.pending) or []
        return [n for n in names if self.layout.pending_pid(n) == pid]

    async def _work(self, pid: int) -> None:
        """Converge ``pid`` while it has work items, if this daemon may act on it."""
        try:
            while True:
                self.dirty.discard(pid)
                items = await self._items(pid)
                if items and await self._may_act(pid) and await self.converge(pid):
                    for it in items:
                        try:
                            await self.store.delete(self.layout.pending_item(it))
                        except NoNodeError:
                            pass
                if pid not in self.dirty:
                    return
        except FsError as e:  # its work items stay; the periodic rescan retries
            log.info("reconciling %d stopped (will retry): %s", pid, e)
        except Exception:  # a driver bug must not stop the daemon
            log.exception("reconciling %d failed (will retry)", pid)
        finally:
            self.active.discard(pid)
            self.dirty.discard(pid)

    async def _may_act(self, pid: int) -> bool:
        """Own ``pid``, unless its VM is another host's (then its work waits
        for that host's daemon) or another daemon owns it."""
        if pid not in self.owners.owned:
            seen = await self.records.cached(pid)
            if seen is not None and not d.reaches(seen, self.driver.scope):
                return False
        return await self.owners.take(pid)

    # -- resync -----------------------------------------------------------------

    async def _resync_loop(self) -> None:
        while True:
            try:
                await self.resync()
            except FsError as e:
                log.info("resync skipped: %s", e)
            await trio.sleep(self.resync_interval)

    async def resync(self) -> None:
        """Take over the VM processes no daemon owns, then converge every
        process this daemon owns and no task works on: a server that ended
        by itself or vanished makes its process end (``exited``), a power
        state changed outside cloudfs is recorded."""
        await self._settle_unconfirmed()
        await self._adopt_unowned()
        for pid in sorted(self.owners.owned):
            if pid in self.active:
                continue
            self.active.add(pid)
            try:
                await self.converge(pid)
            except FsError as e:
                log.info("resync of %d: %s", pid, e)
            except Exception:
                log.exception("resync of %d failed", pid)
            finally:
                self.active.discard(pid)
            if pid in self.dirty:  # work came meanwhile
                self.dirty.discard(pid)
                self._kick(pid)

    async def _settle_unconfirmed(self) -> None:
        """Look again at the servers whose record write failed: one another
        server was recorded for instead (this daemon's session expired
        mid-create and another daemon took the pid over), or whose process
        ended, is a duplicate and is deleted; one that is recorded stays; one
        of a process that records none yet stays too (the next create finds
        and adopts it).  Raises FsError (ZooKeeper trouble: the rest waits
        for the next resync)."""
        async with self._settling:  # one pass at a time (reconnection and resync both start one)
            for pid, sid in sorted(self.unconfirmed.items()):
                cur = await self.records.get(pid)
                if cur is not None and (cur.value.vm is None or cur.value.vm == sid):
                    self._settled(pid, sid)
                    continue
                log.warning("pid %d: server %s was made but %s; deleting it", pid, sid,
                            "the process ended" if cur is None else f"{cur.value.vm} was recorded")
                await self._delete_quietly(pid, sid)
                self._settled(pid, sid)

    def _settled(self, pid: int, sid: str) -> None:
        if self.unconfirmed.get(pid) == sid:  # a newer one for the pid stays
            del self.unconfirmed[pid]

    async def _adopt_unowned(self) -> None:
        owners = set(self.layout.pids(await self.store.children(self.layout.owners)))
        for pid in await self.records.pids():
            if pid == INIT_PID or pid in self.owners.owned or pid in owners:
                continue
            try:
                rec = await self.records.cached(pid)
            except CorruptRecord as e:  # one bad record must not stop the others' resync
                log.warning("resync: %s", e.message)
                continue
            if rec is not None and rec.vm is not None and rec.desired is not Desired.KILLED \
                    and d.reaches(rec, self.driver.scope):
                await self.owners.take(pid)  # first daemon wins; the others see the owner

    # -- converging ---------------------------------------------------------------

    async def converge(self, pid: int) -> bool:
        """Act on ``pid``, which this daemon owns, until the decision table
        has nothing left to do (True), or :data:`MAX_STEPS` actions were
        taken or the pid is no longer ours (False: the rest is left to the
        next round or to its owner).  Raises FsError (ZooKeeper trouble, or a
        driver failure while looking: nothing was changed)."""
        scope = self.driver.scope
        fresh: Server | None = None  # what the last action's driver call reported
        for _ in range(MAX_STEPS):
            if pid not in self.owners.owned:
                return False  # lost with the session (or given up): its owner acts now
            cur = await self.records.get(pid)
            if cur is None:
                await self.owners.release(pid)
                return True
            rec = cur.value
            seen = await self._look(rec, d.look(rec, scope), fresh)
            action = d.decide(rec, seen, scope)
            if action is None:
                return True
            log.info("pid %d (%s/%s): %s", pid, rec.state, rec.desired, action)
            if isinstance(action, d.Disown):  # its server is another host's: its work waits for that host
                await self.owners.release(pid)
                return False
            if isinstance(action, d.End):  # the process is gone (or, with children left, waits for them)
                await self._end(rec, action)
                return True
            fresh = await self._do(cur, action)
        return False

    async def _look(self, rec: Process, want: d.Look, fresh: Server | None) -> d.Seen:
        kids = bool(await self.records.kids(rec.pid)) if want.kids else False
        if want.status and rec.vm:
            if fresh is not None and fresh.id == rec.vm:
                return d.Seen(kids=kids, server=fresh)
            try:
                return d.Seen(kids=kids, server=await self.driver.status(rec.vm))
            except NotOurs:
                return d.Seen(kids=kids, foreign=True)
            except NotFound:
                return d.Seen(kids=kids, gone=True)
        if want.find and not kids:
            return d.Seen(kids=kids, found=tuple(s.id for s in await self.driver.find(rec.pid)))
        return d.Seen(kids=kids)

    async def _do(self, cur: Versioned[Process], action: d.Action) -> Server | None:
        """Carry out a step that leaves the process in place (Note, Create,
        Rebuild, Power) on the record ``cur``; what the driver reported of
        the server, if it was asked."""
        rec = cur.value
        if isinstance(action, d.Note):
            await self.records.write(cur, d.noted(rec, action))  # None: changed meanwhile, decide again
        elif isinstance(action, (d.Create, d.Rebuild)):
            return await self._build(rec, action)
        elif isinstance(action, d.Power):
            return await self._power(rec, action)
        elif isinstance(action, d.Migrate):
            await self._migrate(rec, action)
        return None

    async def _migrate(self, rec: Process, action: d.Migrate) -> None:
        """Move the VM to ``action.host``: state ``migrating``, then the
        move (:attr:`mover` for QEMU VMs, which go from daemon to daemon;
        else the driver's live migration), recorded as done or failed (the
        VM then stays where it was)."""
        pid = rec.pid
        try:
            await self.records.update(pid, lambda now: d.migrating(now, action.vm, action.host))
        except d.Superseded:
            return  # killed, or asked to go elsewhere, meanwhile: decide again
        if self.mover is not None:
            await self.mover.move(pid, action.vm, action.host)
            return
        try:
            server = await self.driver.migrate(action.vm, action.host)
        except DriverError as e:
            log.warning("pid %d: moving %s to %s failed: %s", pid, action.vm, action.host, e)
            with contextlib.suppress(d.Superseded):
                await self.records.update(pid, lambda now: d.move_failed(now, action.vm, action.host, e.message))
            return
        scope = self.driver.scope
        with contextlib.suppress(d.Superseded):
            await self.records.update(pid, lambda now: d.moved(now, action.vm, server, scope, now_iso()))

    async def _end(self, rec: Process, action: d.End) -> None:
        """Delete the servers, then remove the process (cloudfs.exits).
        Besides the ones the decision names, every other server of our
        scope tagged with the pid goes too: a duplicate left by a create
        fenced too late (its daemon paused past its session, or killed
        before it settled ``unconfirmed``).  That look is best effort: if
        the driver cannot list now, the named ones are deleted alone."""
        message = action.message
        delete = list(action.delete)
        if rec.has_image and d.reaches(rec, self.driver.scope):
            try:
                delete += [s.id for s in await self.driver.find(rec.pid) if s.id not in delete]
            except DriverError as e:
                log.info("pid %d: cannot look for other servers tagged with it: %s", rec.pid, e)
        if rec.snapshot and d.reaches(rec, self.driver.scope):  # a fork live child ended before it was built
            try:
                await self.driver.discard_snapshot(rec.snapshot)
            except DriverError as e:
                log.info("pid %d: discarding snapshot %s: %s", rec.pid, rec.snapshot, e)
        for vm in delete:
            try:
                await self.driver.delete(vm)
            except DriverError as e:
                log.warning("pid %d: deleting server %s: %s", rec.pid, vm, e)
                if action.state is State.KILLED:
                    message = f"killed; driver delete failed: {e}"
        if await self.exits.end(rec.pid, action.state, message, reparent=action.reparent):
            await self.owners.release(rec.pid)

    async def _build(self, rec: Process, action: d.Create | d.Rebuild) -> Server | None:
        """Create or rebuild; record the server, or the failure as state error."""
        pid, gen, creating = rec.pid, rec.gen, isinstance(action, d.Create)
        # a rebuilt VM runs a new program: a new credential, recorded only if
        # the rebuild succeeds (until then the old guest keeps attaching)
        secret = "" if creating else new_secret()
        try:
            userdata = await self.data.userdata(pid)
            if creating:
                server = await self.driver.create(ServerSpec(
                    pid=pid, ppid=rec.ppid, name=rec.name, image=rec.image or "", flavor=rec.flavor or "",
                    networks=tuple(rec.networks), userdata=userdata, secret=rec.secret, snapshot=rec.snapshot))
            else:
                server = await self.driver.rebuild(action.vm, rec.image or "", userdata, secret=secret)
        except DriverError as e:
            try:
                await self.records.update(pid, lambda now: d.build_failed(now, e.message, gen, creating))
            except d.Superseded:
                pass  # another daemon's create won: its record stands
            return None
        scope = self.driver.scope
        try:
            await self.records.update(pid, lambda now: d.built(now, server, gen, scope, creating, secret))
        except d.Superseded as lost:
            await self._superseded(pid, server.id, lost.record)
            return None
        except FsError as e:
            if e.errno != errno.ENOENT or not creating:
                if creating:  # made, maybe not recorded (the session went): settled by the resync
                    self.unconfirmed[pid] = server.id
                raise
            # the process ended meanwhile (killed through another daemon
            # after ours lost its session): nobody will ever use this server
            log.warning("pid %d ended while its server %s booted; deleting it", pid, server.id)
            await self._delete_quietly(pid, server.id)
            return None
        return server

    async def _superseded(self, pid: int, mine: str, now: Process) -> None:
        """Our create finished after another daemon had recorded a server
        for ``pid`` (our session expired mid-create and it took over), or
        after a kill: ours is a duplicate or unwanted.  Delete it, and give
        the pid up if its recorded server is beyond our driver's reach."""
        if now.vm is not None and now.vm != mine:
            log.warning("pid %d: server %s was recorded while ours (%s) booted; deleting ours", pid, now.vm, mine)
        else:
            log.info("pid %d was killed while its server %s booted; deleting it", pid, mine)
        await self._delete_quietly(pid, mine)
        if not d.reaches(now, self.driver.scope):
            await self.owners.release(pid)

    async def _delete_quietly(self, pid: int, server_id: str) -> None:
        try:
            await self.driver.delete(server_id)
        except DriverError as e:
            log.warning("pid %d: deleting server %s: %s", pid, server_id, e)

    async def _power(self, rec: Process, action: d.Power) -> Server | None:
        try:
            if action.to is State.STOPPED:
                server = await self.driver.stop(action.vm)
            else:
                server = await self.driver.start(action.vm)
        except DriverError as e:
            await self.records.update(rec.pid, lambda now: d.power_failed(now, e.message))
            return None
        await self.records.update(rec.pid, lambda now: d.powered(now, server.status))
        return server
