"""Notes: Plan 9's asynchronous messages to a process (proc(3) ``note`` and
``notepg``, notify(2)), kept in ZooKeeper so any daemon can post them and
the process reads them through any other.

A note is one short line of text: at most :data:`NOTE_MAX` bytes (Plan 9's
ERRMAX − 1), no NUL and no newline (one trailing newline, as ``echo``
writes, is dropped), not empty.  Posting one creates a sequential znode
``proc/<pid>/note/n-<seq>`` and counts it in the process's ``notes`` quota
in the same multi (cloudfs.quotas; EAGAIN beyond it, and the note is not
posted).  Reading takes the oldest pending note and deletes it (giving its
count back), blocking until there is one, as ``/proc/<pid>/wait`` does for
wait records (cloudfs.waits).  ``notepg`` posts to a process and every
descendant, each a post of its own: one that fails (the process ended, its
notes are full) does not stop the others.

Errors are FsError: EINVAL (a malformed note), EAGAIN (nonblocking read with
no note; a post over the quota), ENOENT (no such process), EIO (a corrupt
note znode, or the store's EIO).
"""

from __future__ import annotations

import errno
import logging

import trio

from ninep.errors import FsError

from .gather import gather
from .quotas import Quotas, charge_note
from .records import Records, make_process_dir, no_process
from .store import BadVersionError, NoNodeError, Store
from .znodes import Layout

log = logging.getLogger(__name__)

#: The longest note, in bytes (Plan 9: ERRMAX 128, less the NUL).
NOTE_MAX = 127


def parse_note(data: bytes) -> bytes:
    """The note a write posts: ``data`` less one trailing newline.
    FsError(EINVAL) if that is empty, longer than NOTE_MAX bytes, or holds a
    NUL or a newline."""
    note = data[:-1] if data.endswith(b"\n") else bytes(data)
    if not note:
        raise FsError(errno.EINVAL, "a note is one line of text, not empty")
    if len(note) > NOTE_MAX:
        raise FsError(errno.EINVAL, f"a note is at most {NOTE_MAX} bytes")
    if b"\0" in note or b"\n" in note:
        raise FsError(errno.EINVAL, "a note is one line of text (no NUL, no newline)")
    return note


class Notes:
    """Posting and taking the notes of the deployment's processes."""

    def __init__(self, store: Store, layout: Layout, records: Records, quotas: Quotas):
        self.store = store
        self.layout = layout
        self.records = records
        self.quotas = quotas

    async def post(self, pid: int, note: bytes) -> None:
        """Post ``note`` (already parsed, :func:`parse_note`) to ``pid``.
        ENOENT if there is no such process, EAGAIN over its ``notes`` quota."""
        L = self.layout
        while True:
            quota = await self.quotas.get(pid)
            t = self.store.transaction()
            t.create(L.note_prefix(pid), note, sequence=True)
            if quota is not None:
                t.set_data(L.quota(pid), charge_note(pid, quota.value).to_json(), quota.version)
            try:
                await self.store.commit(t)
                return
            except BadVersionError:
                continue
            except NoNodeError:  # no note znode yet (made at the first note), or no process
                await make_process_dir(self.store, L.notes(pid), pid)

    async def post_group(self, pid: int, note: bytes) -> int:
        """Post ``note`` to ``pid`` and every descendant (the tree as it is
        listed now).  Returns how many got it; ENOENT if ``pid`` itself does
        not exist.  A descendant that ended meanwhile or whose notes are
        full is skipped (logged)."""
        if not await self.records.exists(pid):
            raise no_process(pid)
        posted, todo, seen = 0, [pid], set()
        while todo:
            p = todo.pop()
            if p in seen:  # a loop in corrupt records: each process once
                continue
            seen.add(p)
            try:
                await self.post(p, note)
                posted += 1
            except FsError as e:
                if p == pid and e.errno == errno.ENOENT:
                    raise
                log.info("notepg %d: not posted to %d: %s", pid, p, e.strerror)
            try:
                todo.extend(sorted(await self.records.kids(p), reverse=True))
            except FsError:
                continue
        return posted

    async def next(self, pid: int, nonblocking: bool) -> bytes:
        """Take the oldest pending note of ``pid``, blocking until one is
        posted.  Cancelling while it waits takes nothing; once the delete
        is sent it is finished shielded and the note returned with no
        checkpoint after, so it is never taken and dropped (as
        cloudfs.waits.Waits.next).  A note znode this code would not write
        is deleted and that read fails with EIO."""
        L = self.layout
        while True:
            names = await self.ready(pid, nonblocking)
            again = False
            for n in sorted(names):
                path = L.note_record(pid, n)
                got, quota = await gather(self.store.get(path), self.quotas.get(pid))
                if got is None:
                    continue
                t = self.store.transaction()
                t.delete(path, got[1].version)
                if quota is not None:
                    t.set_data(L.quota(pid), quota.value.using(notes=-1).to_json(), quota.version)
                try:
                    with trio.CancelScope(shield=True):  # bounded by the store's op_timeout
                        await self.store.commit(t)
                except NoNodeError:
                    continue  # taken by another read
                except BadVersionError:
                    again = True  # the quota moved (a post): take this same note again
                    break
                if not L.is_note_name(n):
                    raise FsError(errno.EIO, f"process {pid} had a note znode cloudfs would not write: {n!r}")
                try:
                    return parse_note(got[0])
                except FsError:
                    raise FsError(errno.EIO, f"process {pid} had a malformed note") from None
            if again:
                continue

    async def ready(self, pid: int, nonblocking: bool = False) -> list[str]:
        """The names under ``pid``'s note znode once there is at least one
        (a child watch), taking nothing.  ENOENT if no such process; EAGAIN
        when ``nonblocking`` and there is none."""
        L = self.layout
        while True:
            try:
                return await self.store.wait_children(L.notes(pid), nonblocking)
            except FsError as e:
                if e.errno == errno.EAGAIN and nonblocking:
                    raise FsError(errno.EAGAIN, f"process {pid} has no note") from None
                if e.errno != errno.ENOENT:
                    raise
            # no note znode: the process has had no note yet, or is gone
            if not await self.records.exists(pid):
                raise no_process(pid)
            await make_process_dir(self.store, L.notes(pid), pid)


__all__ = ["Notes", "parse_note", "NOTE_MAX"]
