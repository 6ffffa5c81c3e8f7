"""The reconciler: brings the compute backend to the state recorded in
ZooKeeper and writes the observed state back.

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

Converging is idempotent (it reads the record and acts on the difference):

- desired ``killed``: once it has no children, delete the VM (also one that a
  lost create left without the record naming it, found by its tags), then
  remove the process and leave a wait record with the parent (children
  first: the last child's removal queues work for its killed parent);
- ``image`` set and no VM, or ``gen`` ≠ ``built_gen``: create (or rebuild,
  Nova-style) with the current user-data → ``running`` (driver failure →
  state ``error`` with its message).  Before creating it asks the driver for
  a server tagged with this deployment and pid, and adopts it if there is one:
  a create whose reply was lost, or a daemon killed mid-boot, leaves no
  duplicate.  A create that finishes after another daemon recorded a
  server for the pid (this daemon's session expired mid-boot and the pid
  was taken over), or after the process ended, deletes its own server
  instead of recording it;
- desired ``stopped``/``running`` vs state: stop/start.

Work items seen before acting are deleted after; ones created meanwhile make
it go round again.
"""

from __future__ import annotations

import errno
import logging

import trio

from ninep.errors import FsError

from .drivers.base import META_SECRET, DriverError, NotFound
from .process import Process
from .proctable import ProcTable
from .store import NoNodeError, NodeExistsError
from .znodes import INIT_PID

log = logging.getLogger(__name__)


class _Superseded(Exception):
    """Aborts a record update: another server was recorded meanwhile."""

    def __init__(self, record: Process):
        super().__init__(record.vm)
        self.record = record


class Reconciler:
    """One daemon's reconciler.  ``daemon_id`` is this daemon's unique name
    (stored in the owner znodes).  Run :meth:`run` in a nursery."""

    def __init__(self, table: ProcTable, daemon_id: str, resync_interval: float | None = 10.0):
        self.table = table
        self.store = table.store
        self.layout = table.layout
        self.driver = table.driver
        self.daemon_id = daemon_id
        self.active: set[int] = set()
        self.owned: set[int] = set()
        self.dirty: set[int] = set()
        self.resync_interval = resync_interval
        self.store.on_reconnect.append(self._reconnected)

    def _reconnected(self, lost: bool) -> None:
        if lost:  # ephemeral owner znodes died with the session
            self.owned.clear()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Watch for work forever (until cancelled)."""
        L = self.layout
        async with trio.open_nursery() as nursery:
            if self.resync_interval:
                nursery.start_soon(self._resync_loop)
            task_status.started()
            while True:
                try:
                    with self.store.watching(L.pending, L.owners) as ev:
                        names = await self.store.children(L.pending, watch=True) or []
                        await self.store.children(L.owners, watch=True)
                        for pid in sorted({int(n.rsplit("-", 1)[0]) for n in names}):
                            if pid in self.active:
                                self.dirty.add(pid)
                            else:
                                self.active.add(pid)
                                nursery.start_soon(self._handle, pid)
                        # a watch, or every resync interval a rescan: work
                        # left by a failed attempt is picked up again
                        with trio.move_on_after(self.resync_interval or 10.0):
                            await ev.wait()
                except FsError as e:
                    log.info("reconciler waiting for ZooKeeper: %s", e)
                    with trio.move_on_after(5):
                        await self.store.wait_connected()
                    await trio.sleep(0.05)

    async def _resync_loop(self) -> None:
        while True:
            try:
                await self.resync()
            except FsError as e:
                log.info("resync skipped: %s", e)
            await trio.sleep(self.resync_interval)

    async def resync(self) -> None:
        """Write the backend's view of this daemon's processes back (like
        Nova's power-state sync; this polls the *driver*, never ZooKeeper):
        a server that ended by itself or vanished makes its process
        ``exited`` (children go to init, a wait record to the parent); a
        power state changed outside cloudfs is recorded.  First it takes over
        the VM processes no daemon owns (theirs restarted or lost its
        session), so they are watched too."""
        await self._adopt_unowned()
        for pid in sorted(self.owned):
            if pid in self.active:
                continue
            r = await self.table.record(pid)
            if r is None:
                self.owned.discard(pid)
                continue
            rec = r[0]
            if not self._reaches(rec):
                await self._disown(pid)
                continue
            if rec.vm is None or rec.desired == "killed" or rec.state not in ("running", "stopped"):
                continue
            try:
                server = await self.driver.status(rec.vm)
            except NotFound:
                server = None
            except DriverError as e:
                log.info("status of %d: %s", pid, e)
                continue
            if server is None or server.status == "exited":
                message = server.message if server is not None else "server vanished"
                if server is not None:
                    try:
                        await self.driver.delete(rec.vm)
                    except DriverError as e:
                        log.info("deleting exited %d: %s", pid, e)
                if await self.table.finalize(pid, "exited", message or "exited", reparent=True):
                    try:
                        await self.store.delete(self.layout.owner(pid))
                    except NoNodeError:
                        pass
                    self.owned.discard(pid)
            elif server.status != rec.state and server.status in ("running", "stopped", "error"):
                observed, msg = server.status, server.message

                def seen(r: Process) -> None:
                    if r.state in ("running", "stopped"):
                        r.state = observed
                        if observed == "error":
                            r.error = msg or "the backend reports an error"

                await self.table.update(pid, seen)

    async def _adopt_unowned(self) -> None:
        owners = set(await self.store.children(self.layout.owners) or [])
        for pid in await self.table.pids():
            if pid == INIT_PID or pid in self.owned or str(pid) in owners:
                continue
            rec = await self.table.cached_record(pid)
            if rec is not None and rec.vm is not None and rec.desired != "killed" and self._reaches(rec):
                await self._own(pid)  # first daemon wins; the others see the owner

    def _reaches(self, rec: Process) -> bool:
        """Whether this daemon's driver can act on ``rec``'s server: it has
        none yet, or it was made by a driver of the same scope (a QEMU VM
        only by the daemon that runs it)."""
        return rec.vm is None or rec.scope in ("", self.driver.scope)

    async def _superseded(self, pid: int, mine: str, rec: Process) -> None:
        """Our create finished after another daemon had recorded a server
        for ``pid`` (our session expired mid-create and it took over), or
        after a kill: ours is a duplicate or unwanted.  Delete it, and give
        the pid up if its recorded server is beyond our driver's reach."""
        if rec.vm is not None and rec.vm != mine:
            log.warning("pid %d: server %s was recorded while ours (%s) booted; deleting ours", pid, rec.vm, mine)
        else:
            log.info("pid %d was killed while its server %s booted; deleting it", pid, mine)
        try:
            await self.driver.delete(mine)
        except DriverError as e:
            log.warning("pid %d: deleting duplicate server %s: %s", pid, mine, e)
        if not self._reaches(rec):
            await self._disown(pid)

    async def _disown(self, pid: int) -> None:
        """Give up ``pid`` (its server is beyond this driver's reach), so
        the daemon that reaches it can take it."""
        if pid not in self.owned:
            return
        self.owned.discard(pid)
        try:
            await self.store.delete(self.layout.owner(pid))
        except NoNodeError:
            pass

    async def _own(self, pid: int) -> bool:
        if pid in self.owned:
            return True
        path = self.layout.owner(pid)
        try:
            await self.store.create(path, self.daemon_id.encode(), ephemeral=True)
        except NodeExistsError:
            got = await self.store.get(path)
            if got is None or got[0] != self.daemon_id.encode() or got[1].ephemeralOwner != self.store.client.client_id[0]:
                return False
        except NoNodeError:
            return False
        self.owned.add(pid)
        return True

    async def _items(self, pid: int) -> list[str]:
        names = await self.store.children(self.layout.pending) or []
        return [n for n in names if n.rsplit("-", 1)[0] == str(pid)]

    async def _handle(self, pid: int) -> None:
        try:
            while True:
                self.dirty.discard(pid)
                items = await self._items(pid)
                if not items:
                    if pid in self.dirty:
                        continue
                    return
                if pid not in self.owned:
                    seen = await self.table.cached_record(pid)
                    if seen is not None and not self._reaches(seen):
                        return  # its VM is another daemon's (host's): the work waits for that daemon
                if not await self._own(pid):
                    return
                r = await self.table.record(pid)
                if r is not None and not self._reaches(r[0]):
                    await self._disown(pid)  # another daemon's server was recorded meanwhile
                    return
                if r is not None:
                    await self.converge(r[0])
                for it in items:
                    try:
                        await self.store.delete(f"{self.layout.pending}/{it}")
                    except NoNodeError:
                        pass
        except FsError as e:  # its work items stay; the periodic rescan retries
            log.info("reconciling %d stopped (will retry): %s", pid, e)
        except Exception:  # a driver bug must not stop the daemon
            log.exception("reconciling %d failed (will retry)", pid)
        finally:
            self.active.discard(pid)
            self.dirty.discard(pid)

    async def converge(self, rec: Process) -> None:
        """Act once on the difference between ``rec`` and the backend."""
        pid = rec.pid
        if rec.desired == "killed":
            if await self.table.kids(pid):
                return  # children first; the last child's end queues us again
            message = "killed"
            vm = rec.vm
            if vm is None and rec.image is not None:
                # a create whose reply was lost (daemon killed mid-boot) may
                # have left a server that the record does not name
                try:
                    found = await self.driver.find(self.table.server_tags(rec))
                    vm = found.id if found is not None else None
                except DriverError as e:
                    log.info("looking for a server of killed %d: %s", pid, e)
            if vm:
                try:
                    await self.driver.delete(vm)
                except DriverError as e:
                    message = f"killed; driver delete failed: {e}"
            if await self.table.finalize(pid, "killed", message):
                try:
                    await self.store.delete(self.layout.owner(pid))
                except NoNodeError:
                    pass
                self.owned.discard(pid)
            return
        if rec.image is None or rec.desired == "new":
            return
        if rec.vm is None or rec.built_gen != rec.gen:
            gen = rec.gen
            creating = rec.vm is None
            try:
                userdata = await self.table.get_userdata(pid)
                if rec.vm is None:
                    tags = self.table.server_tags(rec)
                    # adopt a server an earlier attempt created (lost reply, crash)
                    server = await self.driver.find(tags)
                    if server is None:
                        server = await self.driver.create(rec.name, rec.image, rec.flavor or "", list(rec.networks),
                                                          userdata, metadata={**tags, META_SECRET: rec.secret})
                else:
                    server = await self.driver.rebuild(rec.vm, rec.image, userdata)
            except DriverError as e:
                msg = str(e) or type(e).__name__

                def failed(r: Process) -> None:
                    if creating and r.vm is not None:
                        raise _Superseded(r)  # another daemon's create won: its record stands
                    r.state, r.error, r.built_gen = "error", msg, max(r.built_gen, gen)

                try:
                    rec = await self.table.update(pid, failed)
                except _Superseded:
                    pass
                return

            scope = self.driver.scope

            def built(r: Process) -> None:
                if creating and ((r.vm is not None and r.vm != server.id) or r.desired == "killed"):
                    # another daemon recorded its server, or a kill came while
                    # ours booted (the kill's converge may not see ours)
                    raise _Superseded(r)
                r.vm, r.host, r.addresses = server.id, server.host, list(server.addresses)
                r.scope = scope
                r.built_gen = max(r.built_gen, gen)
                r.error = ""
                if r.desired != "killed":
                    r.state = "running"

            try:
                rec = await self.table.update(pid, built)
            except _Superseded as lost:
                await self._superseded(pid, server.id, lost.record)
                return
            except FsError as e:
                if e.errno != errno.ENOENT or not creating:
                    raise
                # the process ended meanwhile (killed through another daemon
                # after ours lost its session): nobody will ever use this server
                log.warning("pid %d ended while its server %s booted; deleting it", pid, server.id)
                try:
                    await self.driver.delete(server.id)
                except DriverError as de:
                    log.warning("pid %d: deleting server %s: %s", pid, server.id, de)
                return
        if rec.vm is None or rec.state == "error":
            return
        try:
            if rec.desired == "stopped" and rec.state != "stopped":
                await self.driver.stop(rec.vm)
                new_state = "stopped"
            elif rec.desired == "running" and rec.state == "stopped":
                await self.driver.start(rec.vm)
                new_state = "running"
            else:
                return
        except DriverError as e:
            msg = str(e) or type(e).__name__

            def failed2(r: Process) -> None:
                r.state, r.error = "error", msg

            await self.table.update(pid, failed2)
            return

        def powered(r: Process) -> None:
            if r.state in ("running", "stopped"):
                r.state = new_state

        await self.table.update(pid, powered)
