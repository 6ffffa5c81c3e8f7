"""How a process ends: its znodes go, its parent gets a wait record, and
its children (if any) go to init, in one ZooKeeper multi (proc(3)'s exit,
Unix's reparenting of orphans).  Run by the reconciler's executor once the
VM is gone.
"""

from __future__ import annotations

import dataclasses
import errno
import logging

import trio

from ninep.errors import FsError

from .gather import gather
from .process import Desired, State, WaitRecord
from .records import Records
from .store import BadVersionError, NodeExistsError, NoNodeError, NotEmptyError, Store
from .znodes import INIT_PID, Layout

log = logging.getLogger(__name__)

#: Attempts at the ending multi before giving up with EIO (each conflict is
#: another daemon's change, normally gone at the next attempt).
MAX_ATTEMPTS = 50


class Exits:
    """Ending processes of the deployment."""

    def __init__(self, store: Store, layout: Layout, records: Records):
        self.store = store
        self.layout = layout
        self.records = records

    async def end(self, pid: int, state: State, message: str, reparent: bool = False) -> bool:
        """Remove process ``pid``, which ended in ``state`` (EXITED or KILLED)
        with ``message``: all its znodes and work items go, a wait record
        goes to its parent, and a parent being killed gets a work item (its
        children go first).  Returns False (nothing done) while it still has
        children, unless ``reparent``: then they become init's.  True once
        the process is gone (also if it already was).  Retries on
        concurrent changes, at most MAX_ATTEMPTS times (a tree that is not
        what cloudfs writes fails every time): then FsError(EIO), as for the
        store's own failures."""
        L = self.layout
        last: Exception | None = None
        for attempt in range(MAX_ATTEMPTS):
            cur = await self.records.get(pid)
            if cur is None:
                return True
            rec = cur.value
            kids, envs, waits, pend = await gather(
                self.store.children(L.kids(pid)), self.store.children(L.env(pid)),
                self.store.children(L.wait(pid)), self.store.children(L.pending),
            )
            kid_pids = L.pids(kids)
            if kid_pids and not reparent:
                return False
            parent = await self.records.get(rec.ppid) if rec.ppid else None
            t = self.store.transaction()
            for k in kid_pids:
                kid = await self.records.get(k)
                if kid is None:
                    continue
                t.set_data(L.record(k), dataclasses.replace(kid.value, ppid=INIT_PID).to_json(), kid.version)
                t.delete(L.kid(pid, k))
                t.create(L.kid(INIT_PID, k), b"")
            # every child name is deleted, also ones this code would not write,
            # or the parent znodes could never go
            for name in set(kids or ()) - {str(k) for k in kid_pids}:
                t.delete(L.kid_entry(pid, name))
            znodes = L.process_znodes(pid, list(envs or ()), list(waits or ()))
            for path in znodes:
                if path == L.record(pid):
                    t.delete(path, cur.version)
                else:
                    t.delete(path)
            for item in pend or ():
                if L.pending_pid(item) == pid:
                    t.delete(L.pending_item(item))
            if parent is not None:
                # the parent's kill may be recorded meanwhile: then this multi
                # must queue its work (children first), so check its version
                t.check(L.record(rec.ppid), parent.version)
                t.delete(L.kid(rec.ppid, pid))
                t.create(L.wait_prefix(rec.ppid), WaitRecord(pid, rec.name, state, message).to_json(),
                         sequence=True)
                if parent.value.desired is Desired.KILLED:
                    t.create(L.pending_prefix(rec.ppid), b"", sequence=True)
            try:
                await self.store.commit(t)
                return True
            except (BadVersionError, NotEmptyError, NoNodeError, NodeExistsError) as e:
                log.debug("ending %d raced (%s); again", pid, type(e).__name__)
                await trio.sleep(min(0.5, 0.01 * attempt))
                last = e
        raise FsError(errno.EIO, f"cannot end process {pid}: its znodes keep failing the multi "
                                 f"({type(last).__name__}); is the tree corrupt?")
