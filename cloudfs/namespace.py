"""CloudFS: the cloudfs tree as a :class:`ninep.fs.FileSystem`.

A CloudFS is the **operator's** face of the tree (serve it on the FUSE
mount and the operator's unix socket only).  ``attach(uname, aname)`` gives
the root of a view: ``aname`` ``""`` or ``"/"`` is the operator's view (full
rights, no ``/proc/self``); ``"proc/<pid>"`` is the view of process <pid>
with that process's rights (``/proc/self`` walks to it; ENOENT if there is no
such process); a guest's ``"proc/<pid>/<secret>"`` is accepted too (EACCES
if the secret is wrong), so guests can mount from either face.
:meth:`CloudFS.view_for` does the same from Python.
:meth:`CloudFS.public` is the face for the TCP listener: credentials
required (cloudfs.identity).  ``uname`` is not checked on the operator face.

Run one CloudFS per daemon; several daemons on one ZooKeeper root see one
tree.  :func:`open_cloudfs` is the usual way to get one (it connects the
store, creates the layout, runs the reconciler, and cleans up).
"""

from __future__ import annotations

import errno
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import trio

from ninep.errors import FsError
from ninep.fs import FileSystem, Node

from .catalog import Catalog
from .ctl import Command
from .deployment import open_deployment
from .drivers.base import ComputeDriver
from .exits import Exits
from .filestore import FileStore
from .hosts import Hosts
from .identity import PublicFS, parse_attach, secret_matches
from .lifecycle import Lifecycle
from .moves import Moves
from .drivers.qemu import QemuDriver
from .nodes import OPERATOR, PROCESS, READONLY, RootNode, View
from .procdata import ProcData
from .decisions import reaches
from .process import Desired, Process, State
from .notes import Notes
from .pipes import Pipes
from .quotas import DEFAULT_LIMITS, DEFAULT_MAX_PROCESSES, Quotas
from .reconciler import Reconciler
from .sharedfiles import SharedFiles
from .records import Records, no_process
from .store import Store
from .waits import Waits
from .znodes import INIT_PID, Layout

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/cloudfs/default"


class CloudFS(FileSystem):
    """The served tree of one deployment.

    ``store`` a started :class:`Store`; ``driver`` the compute driver;
    ``root`` the deployment's znode (``/cloudfs/<deployment>``);
    ``daemon_id`` this daemon's unique name (owner znodes);
    ``resync_interval`` seconds between backend status syncs (None: never).
    Call :meth:`start` before serving.

    ``limits`` the quota limits new processes get (cloudfs.quotas:
    ``descendants``, ``env-keys``, ``env-bytes``; defaults for the ones not
    given), ``max_processes`` init's ``descendants`` when the tree is made,
    ``adopt_open``: take over (and close) a tree without the store's ACL
    (cloudfs.deployment.open_deployment).  ``files``: the backend of
    ``/files`` (cloudfs.filestore; None: no /files), ``files_limits`` the
    deployment's ``files`` and ``file-bytes`` limits (cloudfs.sharedfiles).
    ``host``: this daemon's name in ``/hosts`` (cloudfs.hosts; default the
    daemon id).

    Its parts, one job each: ``records`` (process records), ``quotas``,
    ``lifecycle`` (fork, exec, kill, stop, start), ``data`` (userdata,
    env), ``waits`` (wait records), ``exits`` (ending a process),
    ``catalog`` (the driver's images, flavors and networks, cached),
    ``reconciler`` (acting on the driver), ``hosts`` (the live daemons).  ``deployment_id`` is the
    deployment's unique id (known after :meth:`start`).
    """

    def __init__(self, store: Store, driver: ComputeDriver, root: str = DEFAULT_ROOT,
                 daemon_id: str | None = None, resync_interval: float | None = 10.0, *,
                 limits: Mapping[str, int] | None = None, max_processes: int = DEFAULT_MAX_PROCESSES,
                 adopt_open: bool = False, files: FileStore | None = None,
                 files_limits: Mapping[str, int] | None = None, host: str | None = None,
                 migrate_listen: str = ""):
        self.store = store
        self.driver = driver
        self.layout = L = Layout(root)
        self.limits = {**DEFAULT_LIMITS, **(limits or {})}
        self.max_processes = max_processes
        self.adopt_open = adopt_open
        self.records = Records(store, L)
        self.quotas = Quotas(store, L)
        self.catalog = Catalog(driver)
        self.lifecycle = Lifecycle(store, L, self.records, self.catalog, self.quotas, self.limits)
        self.data = ProcData(store, L, self.quotas)
        self.waits = Waits(store, L)
        self.notes = Notes(store, L, self.records, self.quotas)
        self.pipes = Pipes(store, L, self.quotas)
        self.exits = Exits(store, L, self.records, self.quotas)
        self.files = SharedFiles(files, store, L, self.quotas, self.records, files_limits) \
            if files is not None else None
        self.daemon_id = daemon_id or f"cloudfs-{uuid.uuid4().hex[:12]}"
        self.reconciler = Reconciler(store, L, self.records, self.data, self.exits, driver, self.daemon_id,
                                     resync_interval)
        self.hosts = Hosts(store, L, host or self.daemon_id, self.daemon_id, driver, migrate_listen)
        self.moves: Moves | None = None
        if isinstance(driver, QemuDriver):  # QEMU VMs move from daemon to daemon (cloudfs.moves)
            self.moves = Moves(store, L, self.records, self.data, self.hosts, driver, self.reconciler.owners.take,
                               migrate_listen)
            self.reconciler.mover = self.moves
        self.deployment_id: str | None = None
        self.started_ns = time.time_ns()
        self._cancel: trio.CancelScope | None = None
        self._public: PublicFS | None = None

    async def prepare(self) -> None:
        """Create the deployment's znodes if missing and bind the driver to
        the deployment's id.  FsError (EACCES: not the deployment's ZooKeeper
        credential; the store's EIO/EAGAIN), ValueError if the driver already
        serves another deployment."""
        if self.deployment_id is None:
            self.deployment_id = await open_deployment(self.store, self.layout, self.max_processes, self.limits,
                                                       self.adopt_open)
            self.driver.bind(self.deployment_id, self.layout.root)
            log.info("deployment %s (id %s)", self.layout.root, self.deployment_id)
            if self.files is not None:
                await self.files.prepare()
                log.info("/files: %s", self.files.backend.description)

    async def start(self, nursery: trio.Nursery) -> None:
        """:meth:`prepare` if not done, then run the reconciler and the
        driver's background work in ``nursery``."""
        await self.prepare()

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with trio.CancelScope() as cs:
                self._cancel = cs
                async with trio.open_nursery() as inner:
                    inner.start_soon(self.driver.run)
                    await inner.start(self.hosts.run)
                    await inner.start(self.reconciler.run)
                    if self.moves is not None:
                        await inner.start(self.moves.run)
                    task_status.started()

        await nursery.start(run)

    @property
    def needs_flush(self) -> bool:
        """True when /files stores at close (Swift): FUSE passes each close(2) on."""
        return self.files is not None and self.files.backend.stores_at_close

    def view_for(self, pid: int | None) -> Node:
        """The root as process ``pid`` sees it, with its rights (None: the
        operator, full rights)."""
        if pid is None:
            return RootNode(View(self, None, OPERATOR))
        return RootNode(View(self, pid, PROCESS))

    def readonly_view(self) -> Node:
        """The root of the anonymous read-only view (cloudfs.identity)."""
        return RootNode(View(self, None, READONLY))

    def public(self) -> PublicFS:
        """The face to serve where anyone can connect (the TCP listener):
        attaching needs a process credential, else the view is read-only.
        One PublicFS per CloudFS (cached)."""
        if self._public is None:
            self._public = PublicFS(self)
        return self._public

    async def attach(self, uname: str, aname: str, n_uname: int | None = None) -> Node:
        """aname ``""``: the operator's view; ``proc/<pid>`` (or a guest's
        ``proc/<pid>/<secret>``, the secret checked: EACCES if wrong, ENOENT
        for no such process) that process's view.  Parsed by
        cloudfs.identity.parse_attach, the same grammar as the public face;
        ENOENT for any other aname (the operator may know what exists)."""
        try:
            cred = parse_attach("", aname)
        except FsError:
            raise FsError(errno.ENOENT, "unknown aname: use '', 'proc/<pid>' or 'proc/<pid>/<secret>'") \
                from None
        if cred is None:
            return self.view_for(None)
        rec = await self.records.cached(cred.pid)
        if rec is None:
            raise FsError(errno.ENOENT, f"no process {cred.pid} to attach as")
        if cred.secret is not None and not secret_matches(rec.secret, cred.secret):
            raise FsError(errno.EACCES, f"bad credential for process {cred.pid}")
        return self.view_for(cred.pid)

    async def run_ctl(self, pid: int, cmd: Command) -> bytes:
        """Carry out a parsed ctl command on ``pid``; the bytes a read of the
        same open ctl returns (fork: ``b"<pid>\\n"``)."""
        if cmd.verb == "fork" and cmd.live:
            return f"{await self._fork_live(pid, cmd.name)}\n".encode()
        if cmd.verb == "fork":
            return f"{await self.lifecycle.fork(pid, cmd.name)}\n".encode()
        if cmd.verb == "migrate":
            await self._migrate(pid, cmd.host or "")
            return b""
        if cmd.verb == "exec":
            await self.lifecycle.exec(pid, cmd)
        elif cmd.verb == "kill":
            await self.lifecycle.kill(pid)
        elif cmd.verb == "stop":
            await self.lifecycle.set_power(pid, Desired.STOPPED)
        elif cmd.verb == "start":
            await self.lifecycle.set_power(pid, Desired.RUNNING)
        return b""

    async def _fork_live(self, pid: int, name: str | None) -> int:
        """``fork live``: copy ``pid``'s running VM (the driver's snapshot,
        taken now, while the ctl write waits), then fork a child restored
        from it.  The parent's VM must be this daemon's to reach (EXDEV:
        write to its ctl through the daemon of its host) and built (EBUSY);
        EINVAL for init or a process with no VM; ESRCH while it is being
        killed; the driver's EOPNOTSUPP where it cannot copy a VM, ENOSPC without
        room for the copy (cloudfs.drivers.scratchroom).  A failed
        fork discards the snapshot."""
        rec = await self.records.get(pid)
        if rec is None:
            raise no_process(pid)
        p = rec.value
        if pid == INIT_PID or not p.has_image:
            raise FsError(errno.EINVAL, f"fork live: process {pid} has no VM to copy")
        if p.desired is Desired.KILLED:
            raise FsError(errno.ESRCH, f"process {pid} is being killed")
        if p.vm is None or p.state not in (State.RUNNING, State.STOPPED):
            raise FsError(errno.EBUSY, f"fork live: process {pid} is {p.state}, not running")
        if not reaches(p, self.driver.scope):
            raise FsError(errno.EXDEV, f"fork live: process {pid}'s VM runs on host {p.host or '?'}; "
                                       "write to its ctl through the daemon there")
        snap = await self.driver.snapshot(p.vm)
        try:
            return await self.lifecycle.fork(pid, name, snapshot=snap, scope=self.driver.scope)
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await self.driver.discard_snapshot(snap)
            raise

    async def _migrate(self, pid: int, host: str) -> None:
        """``migrate HOST``: ask for ``pid``'s VM to move to ``host`` (the
        owning daemon's reconciler moves it: state ``migrating``, then the
        new host in ``status``, or the VM stays and ``status``'s ``move``
        says why).  A QEMU VM moves to the daemon named ``host`` in
        ``/hosts``; other drivers' to their compute host ``host``.  EINVAL
        for init, a process without a VM, a host not in ``/hosts`` (QEMU)
        or the host it is on; EBUSY while it is not running or moving
        already; ESRCH while it is being killed; EOPNOTSUPP when the host's
        daemon is not a QEMU one or takes no VMs (``--migrate-listen``)."""
        rec = (await self.records.require(pid)).value
        if pid == INIT_PID or not rec.has_image:
            raise FsError(errno.EINVAL, f"migrate: process {pid} has no VM to move")
        qemu = rec.scope.startswith("qemu!")
        if qemu:
            try:
                target = await self.hosts.get(host)
            except FsError as e:
                if e.errno == errno.ENOENT:
                    raise FsError(errno.EINVAL, f"migrate: no host {host!r} in /hosts") from None
                raise
            if target.driver != "qemu":
                raise FsError(errno.EOPNOTSUPP, f"migrate: host {host} runs the {target.driver} driver, not qemu")
            if not target.migrate:
                raise FsError(errno.EOPNOTSUPP, f"migrate: host {host} takes no VMs (cloudfs up --migrate-listen)")
        elif reaches(rec, self.driver.scope) and not self.driver.migrates:
            raise FsError(errno.EOPNOTSUPP, f"migrate: the {self.driver.kind} driver cannot move a VM to another host")

        def change(now: Process) -> None:
            if now.desired is Desired.KILLED:
                raise FsError(errno.ESRCH, f"process {pid} is being killed")
            if now.vm is None or now.state not in (State.RUNNING, State.MIGRATING):
                raise FsError(errno.EBUSY, f"migrate: process {pid} is {now.state}, not running")
            if now.move_to or now.state is State.MIGRATING:
                raise FsError(errno.EBUSY, f"migrate: process {pid} is moving to {now.move_to or 'another host'}")
            if (qemu and now.scope == target.scope) or (not qemu and now.host == host):
                raise FsError(errno.EINVAL, f"migrate: process {pid} is on host {host} already")
            now.move_to = host

        await self.records.update(pid, change, work=True)

    async def close(self) -> None:
        """Stop the reconciler (the store is closed by whoever opened it)."""
        if self._cancel is not None:
            self._cancel.cancel()
        if self.files is not None:
            await self.files.backend.close()


@asynccontextmanager
async def open_cloudfs(hosts: str, driver: ComputeDriver, root: str = DEFAULT_ROOT, *,
                       daemon_id: str | None = None, resync_interval: float | None = 10.0,
                       limits: Mapping[str, int] | None = None, max_processes: int = DEFAULT_MAX_PROCESSES,
                       zk_auth: str | None = None, adopt_open: bool = False,
                       files: FileStore | None = None, files_limits: Mapping[str, int] | None = None,
                       host: str | None = None, migrate_listen: str = "", **store_options) -> AsyncIterator[CloudFS]:
    """Connect to ZooKeeper at ``hosts``, start a CloudFS on ``root`` and
    yield it; on exit stop the reconciler and close the session.
    ``limits`` and ``max_processes`` as for :class:`CloudFS`; ``zk_auth`` a
    digest credential ``user:password``: every znode of the deployment then
    carries an ACL only holders of it pass (None: open, as for tests);
    ``files``/``files_limits``/``host`` as for :class:`CloudFS`; ``store_options`` go
    to :class:`Store` (timeouts)."""
    store = Store(hosts, auth=zk_auth, **store_options)
    await store.start()
    try:
        fs = CloudFS(store, driver, root, daemon_id, resync_interval, limits=limits, max_processes=max_processes,
                     adopt_open=adopt_open, files=files, files_limits=files_limits, host=host,
                     migrate_listen=migrate_listen)
        await fs.prepare()  # its errors come as themselves, not in an exception group
        async with trio.open_nursery() as nursery:
            await fs.start(nursery)
            try:
                yield fs
            finally:
                await fs.close()
                nursery.cancel_scope.cancel()
    finally:
        # Close the session even when cancelled: its ephemeral owner znodes
        # must go now, so another daemon can take its processes over.
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await store.close()
