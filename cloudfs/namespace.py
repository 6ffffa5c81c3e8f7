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
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ninep.errors import FsError
from ninep.fs import FileSystem, Node

from .ctl import Command
from .drivers.base import ComputeDriver
from .identity import PublicFS, secret_matches
from .nodes import OPERATOR, PROCESS, READONLY, RootNode, View
from .proctable import ProcTable
from .reconciler import Reconciler
from .store import Store
from .znodes import Layout

DEFAULT_ROOT = "/cloudfs/default"


class CloudFS(FileSystem):
    """The served tree of one deployment.

    ``store`` a started :class:`Store`; ``driver`` the compute driver;
    ``root`` the deployment's znode (``/cloudfs/<deployment>``);
    ``daemon_id`` this daemon's unique name (owner znodes);
    ``resync_interval`` seconds between backend status syncs (None: never).
    Call :meth:`start` before serving.
    """

    def __init__(self, store: Store, driver: ComputeDriver, root: str = DEFAULT_ROOT,
                 daemon_id: str | None = None, resync_interval: float | None = 10.0):
        self.store = store
        self.driver = driver
        self.layout = Layout(root)
        self.table = ProcTable(store, self.layout, driver)
        self.daemon_id = daemon_id or f"cloudfs-{uuid.uuid4().hex[:12]}"
        self.reconciler = Reconciler(self.table, self.daemon_id, resync_interval)
        self.started_ns = time.time_ns()
        self._cancel: trio.CancelScope | None = None
        self._public: PublicFS | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        """Create the znode layout if missing and run the reconciler in ``nursery``."""
        await self.table.init_layout()

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with trio.CancelScope() as cs:
                self._cancel = cs
                await self.reconciler.run(task_status=task_status)

        await nursery.start(run)

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
        name = aname.strip("/")
        if name == "":
            return self.view_for(None)
        parts = name.split("/")
        if len(parts) in (2, 3) and parts[0] == "proc" and parts[1].isdigit():
            pid = int(parts[1])
            r = await self.table.record(pid)
            if r is None:
                raise FsError(errno.ENOENT, f"no process {pid} to attach as")
            # a guest's aname (proc/<pid>/<secret>) works here too; a wrong secret is refused
            if len(parts) == 3 and not secret_matches(r[0].secret, parts[2]):
                raise FsError(errno.EACCES, f"bad credential for process {pid}")
            return self.view_for(pid)
        raise FsError(errno.ENOENT, f"unknown aname {aname!r}: use '', 'proc/<pid>' or 'proc/<pid>/<secret>'")

    async def run_ctl(self, pid: int, cmd: Command) -> bytes:
        """Carry out a parsed ctl command on ``pid``; the bytes a read of the
        same open ctl returns (fork: ``b"<pid>\\n"``)."""
        if cmd.verb == "fork":
            return f"{await self.table.fork(pid, cmd.name)}\n".encode()
        if cmd.verb == "exec":
            await self.table.exec(pid, cmd)
        elif cmd.verb == "kill":
            await self.table.kill(pid)
        elif cmd.verb == "stop":
            await self.table.set_power(pid, "stopped")
        elif cmd.verb == "start":
            await self.table.set_power(pid, "running")
        return b""

    async def close(self) -> None:
        """Stop the reconciler (the store is closed by whoever opened it)."""
        if self._cancel is not None:
            self._cancel.cancel()


@asynccontextmanager
async def open_cloudfs(hosts: str, driver: ComputeDriver, root: str = DEFAULT_ROOT, *,
                       daemon_id: str | None = None, resync_interval: float | None = 10.0,
                       **store_options) -> AsyncIterator[CloudFS]:
    """Connect to ZooKeeper at ``hosts``, start a CloudFS on ``root`` and
    yield it; on exit stop the reconciler and close the session.
    ``store_options`` go to :class:`Store` (timeouts)."""
    store = Store(hosts, **store_options)
    await store.start()
    try:
        async with trio.open_nursery() as nursery:
            fs = CloudFS(store, driver, root, daemon_id, resync_interval)
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
