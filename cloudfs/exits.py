"""How a process ends: its znodes go, its parent gets a wait record, its
children (if any) go to init, and its ancestors get its quota count back
(proc(3)'s exit, Unix's reparenting of orphans; cloudfs.quotas).  Run by the
reconciler's executor once the VM is gone.

ZooKeeper refuses a request over its ``jute.maxbuffer`` (1 MiB), so a
process with many env keys, wait records, work items or children is ended
in steps, each one multi under :data:`MULTI_BYTES` and :data:`MULTI_OPS`:
first its env keys, wait records, notes, pipes and work items are deleted in batches,
then its children are moved to init in batches (each batch with the counts
of the ancestors it leaves), and last one multi removes the process itself
and writes the wait record.  Only that last step is what others see as the
end; the steps before it only remove what nobody reads any more (a process
being ended takes no new env keys: see cloudfs.procdata's quota multi).
"""

from __future__ import annotations

import dataclasses
import errno
import logging

import trio

from ninep.errors import FsError

from .gather import gather
from .process import Desired, State, Versioned, WaitRecord
from .quotas import DESCENDANTS, Quota, Quotas
from .records import Records
from .store import BadVersionError, NodeExistsError, NoNodeError, NotEmptyError, Store
from .znodes import INIT_PID, Layout

log = logging.getLogger(__name__)

#: Attempts at each step before giving up with EIO (each conflict is
#: another daemon's change, normally gone at the next attempt).
MAX_ATTEMPTS = 50
#: A multi's size budget: bytes of paths and data, and operations (well
#: under ZooKeeper's 1 MiB jute.maxbuffer).
MULTI_BYTES = 256 * 1024
MULTI_OPS = 500
#: Children moved to init per multi (each move is three operations plus a
#: record rewrite).
KIDS_PER_MULTI = 100
#: Work items of the ending process deleted in its last multi at most.
PENDING_PER_MULTI = 64

_RACES = (BadVersionError, NotEmptyError, NoNodeError, NodeExistsError)


class Exits:
    """Ending processes of the deployment."""

    def __init__(self, store: Store, layout: Layout, records: Records, quotas: Quotas):
        self.store = store
        self.layout = layout
        self.records = records
        self.quotas = quotas

    async def end(self, pid: int, state: State, message: str, reparent: bool = False) -> bool:
        """Remove process ``pid``, which ended in ``state`` (EXITED or KILLED)
        with ``message``: all its znodes and work items go, a wait record
        goes to its parent, its ancestors' ``descendants`` counts go down,
        and a parent being killed gets a work item (its children go first).
        Returns False (nothing done) while it still has children, unless
        ``reparent``: then they become init's.  True once the process is
        gone (also if it already was).  Retries on concurrent changes, at
        most MAX_ATTEMPTS times per step (a tree that is not what cloudfs
        writes fails every time): then FsError(EIO), as for the store's own
        failures."""
        L = self.layout
        cur = await self.records.get(pid)
        if cur is None:
            return True
        if L.pids(await self.store.children(L.kids(pid))) and not reparent:
            return False
        await self._clear(pid)
        last: Exception | None = None
        for attempt in range(MAX_ATTEMPTS):
            if reparent:  # again after a race: a child may have been forked meanwhile
                await self._move_kids(pid)
            cur = await self.records.get(pid)
            if cur is None:
                return True
            try:
                return await self._remove(pid, cur, state, message, reparent)
            except _RACES as e:
                log.debug("ending %d raced (%s); again", pid, type(e).__name__)
                last = e
                await trio.sleep(min(0.5, 0.01 * attempt))
        raise _stuck(pid, last)

    # -- the steps -------------------------------------------------------------

    async def _clear(self, pid: int) -> None:
        """Delete ``pid``'s env keys, wait records, notes and pipes, in batches.
        Its work items stay until the last multi (:meth:`_remove`): if ending
        stops half way (the session is lost), they bring a daemon back to
        finish it."""
        L = self.layout
        last: Exception | None = None
        for attempt in range(MAX_ATTEMPTS):
            envs, waits, notes = await gather(
                self.store.children(L.env(pid)), self.store.children(L.wait(pid)), self.store.children(L.notes(pid)))
            paths = [L.env_key(pid, k) for k in envs or ()] + [L.wait_record(pid, w) for w in waits or ()]
            paths += [L.note_record(pid, n) for n in notes or ()]
            pipes = await self._pipes(pid)
            for name, kids in (pipes or {}).items():  # messages and opens, then the pipes
                paths += [f"{L.pipe(pid, name)}/{k}" for k in kids]
            paths += [L.pipe(pid, name) for name in pipes or {}]
            if not paths:
                return
            try:
                for batch in _batches(paths):
                    t = self.store.transaction()
                    for p in batch:
                        t.delete(p)
                    await self.store.commit(t)
                return
            except _RACES as e:  # deleted meanwhile (another attempt): list again
                last = e
                await trio.sleep(min(0.5, 0.01 * attempt))
        raise _stuck(pid, last)

    async def _pipes(self, pid: int) -> dict[str, list[str]] | None:
        """``pid``'s pipes, each with its children (None: no pipe znode)."""
        L = self.layout
        names = await self.store.children(L.pipes(pid))
        if names is None:
            return None
        kids = await gather(*(self.store.children(L.pipe(pid, n)) for n in names))
        return {n: list(k) for n, k in zip(names, kids) if k is not None}

    async def _move_kids(self, pid: int) -> None:
        """Make ``pid``'s children init's, KIDS_PER_MULTI at a time: each
        multi rewrites their records, moves their ``kids`` links, and takes
        their subtrees off the counts of ``pid`` and of its ancestors but
        init (which keeps them)."""
        L = self.layout
        last: Exception | None = None
        failures = 0
        while failures < MAX_ATTEMPTS:
            kids = L.pids(await self.store.children(L.kids(pid)))
            if not kids:
                return
            batch = kids[:KIDS_PER_MULTI]
            records = await self.records.chain(pid)
            chain = [r.value.pid for r in records if r.value.pid != INIT_PID]
            got = await gather(*(self.records.get(k) for k in batch), *(self.quotas.get(k) for k in batch),
                               *(self.quotas.get(a) for a in chain))
            recs, kid_quotas, quotas = got[:len(batch)], got[len(batch):2 * len(batch)], got[2 * len(batch):]
            t = self.store.transaction()
            for r in records[1:]:  # the ancestors whose counts change are still the ancestors
                t.check(L.record(r.value.pid), r.version)
            moved = 0
            for k, kid, kq in zip(batch, recs, kid_quotas):
                t.delete(L.kid(pid, k))
                if kid is None:
                    continue
                t.set_data(L.record(k), dataclasses.replace(kid.value, ppid=INIT_PID).to_json(), kid.version)
                t.create(L.kid(INIT_PID, k), b"")
                moved += 1 + (kq.value.used[DESCENDANTS] if kq is not None else 0)
            _uncount(t, L, chain, quotas, moved)
            try:
                await self.store.commit(t)
            except _RACES as e:
                last, failures = e, failures + 1
                await trio.sleep(min(0.5, 0.01 * failures))
        raise _stuck(pid, last)

    async def _remove(self, pid: int, cur: Versioned, state: State, message: str, reparent: bool) -> bool:
        """The last multi: ``pid``'s own znodes, the counts of its ancestors,
        the wait record.  False if it has children again (and not
        ``reparent``: they are moved first)."""
        L = self.layout
        rec = cur.value
        kids, envs, waits, notes, pipes, quota, pend = await gather(
            self.store.children(L.kids(pid)), self.store.children(L.env(pid)), self.store.children(L.wait(pid)),
            self.store.children(L.notes(pid)), self._pipes(pid), self.quotas.get(pid), self.store.children(L.pending))
        if L.pids(kids):
            if not reparent:
                return False
            raise NotEmptyError()  # forked meanwhile: move them too
        records = (await self.records.chain(pid))[1:]
        chain = [r.value.pid for r in records]
        quotas = await gather(*(self.quotas.get(a) for a in chain))
        parent = records[0] if records and records[0].value.pid == rec.ppid else None
        t = self.store.transaction()
        for r in records[1:]:  # the ancestors whose counts change are still the ancestors
            t.check(L.record(r.value.pid), r.version)
        # every child name is deleted, also ones this code would not write,
        # or the parent znodes could never go
        for name in kids or ():
            t.delete(L.kid_entry(pid, name))
        for path in L.process_znodes(pid, list(envs or ()), list(waits or ()), quota=quota is not None,
                                     note_names=None if notes is None else list(notes), pipes=pipes):
            if path == L.record(pid):
                t.delete(path, cur.version)
            elif quota is not None and path == L.quota(pid):
                t.delete(path, quota.version)
            else:
                t.delete(path)
        # its work items go with it (any beyond PENDING_PER_MULTI are the
        # reconciler's to drop: work for a pid without a record converges at once)
        for name in [n for n in pend or () if L.pending_pid(n) == pid][:PENDING_PER_MULTI]:
            t.delete(L.pending_item(name))
        # it leaves its ancestors' counts (its subtree is empty by now)
        _uncount(t, L, chain, quotas, 1)
        if parent is not None:
            # the parent's kill may be recorded meanwhile: then this multi
            # must queue its work (children first), so check its version
            t.check(L.record(rec.ppid), parent.version)
            t.delete(L.kid(rec.ppid, pid))
            t.create(L.wait_prefix(rec.ppid), WaitRecord(pid, rec.name, state, message).to_json(), sequence=True)
            if parent.value.desired is Desired.KILLED:
                t.create(L.pending_prefix(rec.ppid), b"", sequence=True)
        await self.store.commit(t)
        return True


def _uncount(t, L: Layout, chain: list[int], quotas: list[Versioned[Quota] | None], n: int) -> None:
    """Add to ``t`` the counts of ``chain``'s quotas less ``n`` descendants."""
    if n <= 0:
        return
    for a, q in zip(chain, quotas):
        if q is not None:
            t.set_data(L.quota(a), q.value.using(descendants=-n).to_json(), q.version)


def _batches(paths: list[str]) -> list[list[str]]:
    """``paths`` cut into deletion batches under MULTI_BYTES and MULTI_OPS."""
    out: list[list[str]] = [[]]
    size = 0
    for p in paths:
        cost = len(p.encode()) + 16
        if out[-1] and (size + cost > MULTI_BYTES or len(out[-1]) >= MULTI_OPS):
            out.append([])
            size = 0
        out[-1].append(p)
        size += cost
    return out


def _stuck(pid: int, last: Exception | None) -> FsError:
    return FsError(errno.EIO, f"cannot end process {pid}: its znodes keep failing the multi "
                              f"({type(last).__name__ if last else 'no answer'}); is the tree corrupt?")
