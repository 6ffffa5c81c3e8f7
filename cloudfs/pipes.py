"""Named pipes of a process (RACK's pipes, with Plan 9 pipe(3) message
semantics), kept in ZooKeeper so writers and the reader may be on
different daemons.

Znodes, under the owner process::

    proc/<pid>/pipe                    made with the process's first pipe
    proc/<pid>/pipe/<name>             JSON {"w": had a writer, "r": had a reader}
    proc/<pid>/pipe/<name>/m-<seq>     one message (≤ PIPE_MSG_MAX bytes)
    proc/<pid>/pipe/<name>/w-<uuid>    ephemeral: one open for writing
    proc/<pid>/pipe/<name>/r-<uuid>    ephemeral: one open for reading

Each write is one message, created sequentially, so one writer's messages
arrive in order; a read takes the oldest message whole (a read shorter than
the message gets its start, and the rest is dropped, as Plan 9's message
pipes do).  Reads block until a message arrives; a read returns 0 bytes
(EOF) once the pipe has had a writer, no open for writing remains and no
message is left.  Opens are ephemeral znodes of the serving daemon's
ZooKeeper session: an open whose connection or daemon goes away stops
counting (at once on a clean close or a dropped connection, within the
session timeout when a daemon dies).  Once the pipe has had a reader and
no open for reading remains, it is closed for good: writes and new opens
fail with EPIPE.  Every open makes the pipe znode's version change (its
data is set in the same multi), which is how a reader deciding on EOF, or
a writer on EPIPE, knows that the children it listed are still the opens.
An open acts on the pipe it opened: once that pipe is removed (its open
znode is gone with it), its reads fail with ENOENT and its writes with
EPIPE, also if a pipe of the same name was made since.

Quotas (cloudfs.quotas) of the owner: ``pipes`` (how many it may have) and
``pipe-bytes`` (unread messages in all its pipes, each counted as its
length plus PIPE_MSG_COST, the cost of its znode, so tiny messages cannot
make unbounded znodes): a write that would pass ``pipe-bytes`` waits until
the reader makes room (EAGAIN with O_NONBLOCK), as a full pipe does.
Removing a pipe first closes it (so no write lands), then deletes its
messages in multis under ZooKeeper's request limit.

Errors are FsError: EEXIST, ENOENT (no such pipe or process), EPIPE, EFBIG
(a write over PIPE_MSG_MAX), EAGAIN (a nonblocking read with nothing to
read, a nonblocking write with no room, ``pipes`` exceeded), EINVAL (bad
name), EIO (a corrupt znode, a pipe that keeps changing under ``rm``, or
the store's EIO).
"""

from __future__ import annotations

import errno
import json
import logging
import uuid

import trio

from ninep.errors import FsError

from .gather import gather
from .quotas import PIPE_BYTES, PIPES, Quota, Quotas
from .records import make_process_dir, no_process
from .store import BadVersionError, NodeExistsError, NoNodeError, NotEmptyError, Store
from .znodes import Layout

log = logging.getLogger(__name__)

#: The largest message (one write), in bytes.
PIPE_MSG_MAX = 64 * 1024
#: What a message counts against ``pipe-bytes`` beyond its length: its
#: znode (name, stat, ZooKeeper's bookkeeping).  So 1 MiB holds at most
#: 4096 messages however small.
PIPE_MSG_COST = 256
#: Messages deleted per multi when a pipe is removed (each under
#: PIPE_MSG_MAX bytes of path and data, so well under ZooKeeper's 1 MiB).
REMOVE_BATCH = 200
#: Attempts at each step of removing a pipe before EIO.
MAX_ATTEMPTS = 50
WRITER, READER = "w", "r"


def _state(data: bytes) -> dict:
    try:
        st = json.loads(data or b"{}")
    except ValueError:
        raise FsError(errno.EIO, "corrupt pipe znode") from None
    if not isinstance(st, dict):
        raise FsError(errno.EIO, "corrupt pipe znode")
    return {"w": bool(st.get("w")), "r": bool(st.get("r")), "gone": bool(st.get("gone"))}


def _encode(st: dict) -> bytes:
    return json.dumps({k: int(v) for k, v in st.items()}, separators=(",", ":")).encode()


def _has(kids: list[str], kind: str) -> bool:
    return any(k.startswith(f"{kind}-") for k in kids)


def cost(size: int) -> int:
    """What a message of ``size`` bytes counts against ``pipe-bytes``."""
    return size + PIPE_MSG_COST


def charge_pipe(pid: int, q: Quota, size: int) -> Quota | None:
    """``q`` after a message of ``size`` bytes waits in ``pid``'s pipes, or
    None when that would pass ``pipe-bytes`` now (the writer waits).
    FsError(EFBIG) if it is bigger than the whole limit."""
    c = cost(size)
    if c > q.limits[PIPE_BYTES]:
        raise FsError(errno.EFBIG, f"a message of {size} bytes is over process {pid}'s limit {PIPE_BYTES}")
    if q.used[PIPE_BYTES] + c > q.limits[PIPE_BYTES]:
        return None
    return q.using(pipe_bytes=c)


class Pipes:
    """The pipes of the deployment's processes."""

    def __init__(self, store: Store, layout: Layout, quotas: Quotas):
        self.store = store
        self.layout = layout
        self.quotas = quotas

    async def names(self, pid: int) -> list[str]:
        """``pid``'s pipes, sorted; ENOENT if no such process."""
        names = await self.store.children(self.layout.pipes(pid))
        if names is None:
            if await self.store.exists(self.layout.record(pid)) is None:
                raise no_process(pid)
            return []
        return sorted(names)

    async def exists(self, pid: int, name: str) -> bool:
        return await self.store.exists(self.layout.pipe(pid, name)) is not None

    async def create(self, pid: int, name: str) -> None:
        """Make pipe ``name`` of ``pid`` (name checked by the caller).
        EEXIST if it exists, EAGAIN beyond the ``pipes`` quota."""
        L = self.layout
        while True:
            quota = await self.quotas.get(pid)
            t = self.store.transaction()
            t.create(L.pipe(pid, name), _encode({"w": False, "r": False}))
            if quota is not None:
                q = quota.value
                if q.used[PIPES] + 1 > q.limits[PIPES]:
                    raise FsError(errno.EAGAIN, f"process {pid} may have at most {q.limits[PIPES]} pipes "
                                                f"(limit {PIPES})")
                t.set_data(L.quota(pid), q.using(pipes=1).to_json(), quota.version)
            try:
                await self.store.commit(t)
                return
            except BadVersionError:
                continue
            except NodeExistsError:
                raise FsError(errno.EEXIST, f"pipe {name!r} of process {pid} exists") from None
            except NoNodeError:  # no pipe znode yet (made with the first pipe), or no process
                await make_process_dir(self.store, L.pipes(pid), pid)

    async def remove(self, pid: int, name: str) -> None:
        """Delete the pipe: first mark it gone (writes fail with EPIPE from
        then on), then delete its messages REMOVE_BATCH at a time, giving
        their bytes back to the owner's quota, then its opens and itself
        (their reads then fail with ENOENT).  ENOENT if there is no such
        pipe; EIO if it keeps changing."""
        L = self.layout
        path = L.pipe(pid, name)
        for attempt in range(MAX_ATTEMPTS):
            got = await self.store.get(path)
            if got is None:
                raise FsError(errno.ENOENT, f"no pipe {name!r} of process {pid}")
            st = _state(got[0])
            if st["gone"]:
                break
            try:
                await self.store.set(path, _encode({**st, "gone": True}), got[1].version)
                break
            except BadVersionError:
                await trio.sleep(min(0.5, 0.01 * attempt))
            except NoNodeError:
                raise FsError(errno.ENOENT, f"no pipe {name!r} of process {pid}") from None
        else:
            raise FsError(errno.EIO, f"pipe {name!r} of process {pid} keeps changing; try again")
        for attempt in range(MAX_ATTEMPTS):
            kids = await self.store.children(path)
            if kids is None:
                return  # removed by someone else meanwhile
            msgs = sorted(k for k in kids if k.startswith("m-"))
            last = len(msgs) <= REMOVE_BATCH
            batch = msgs[:REMOVE_BATCH]
            gots, quota = await gather(gather(*(self.store.get(f"{path}/{m}") for m in batch)),
                                       self.quotas.get(pid))
            t = self.store.transaction()
            freed = 0
            for m, g in zip(batch, gots):
                if g is not None:
                    t.delete(f"{path}/{m}")
                    freed += cost(len(g[0]))
            if last:
                for k in kids:
                    if not k.startswith("m-"):
                        t.delete(f"{path}/{k}")
                t.delete(path)
            if quota is not None and (freed or last):
                t.set_data(L.quota(pid), quota.value.using(pipes=-1 if last else 0, pipe_bytes=-freed).to_json(),
                           quota.version)
            try:
                await self.store.commit(t)
                if last:
                    return
            except (BadVersionError, NoNodeError, NotEmptyError):
                await trio.sleep(min(0.5, 0.01 * attempt))
        raise FsError(errno.EIO, f"pipe {name!r} of process {pid} keeps changing; try again")

    async def open_end(self, pid: int, name: str, kind: str) -> str:
        """Count one open of the pipe for writing (``kind`` WRITER) or
        reading (READER): an ephemeral znode of this daemon's session, whose
        path is returned (give it to the other calls and to
        :meth:`close_end`).  ENOENT if there is no such pipe, EPIPE if it is
        closed.  If this is cancelled or fails after the multi may have
        been applied, the open znode is deleted again."""
        L = self.layout
        path = L.pipe(pid, name)
        end = f"{path}/{kind}-{uuid.uuid4().hex}"
        while True:
            got = await self.store.get(path)
            if got is None:
                if await self.store.exists(L.record(pid)) is None:
                    raise no_process(pid)
                raise FsError(errno.ENOENT, f"no pipe {name!r} of process {pid}")
            st = _state(got[0])
            if st["gone"]:
                raise FsError(errno.ENOENT, f"no pipe {name!r} of process {pid}")
            if st["r"]:
                kids = await self.store.children(path)
                if kids is not None and not _has(kids, READER):
                    raise FsError(errno.EPIPE, f"pipe {name!r} of process {pid} is closed (its reader went away)")
            t = self.store.transaction()
            t.set_data(path, _encode({**st, "w": st["w"] or kind == WRITER, "r": st["r"] or kind == READER}),
                       got[1].version)
            t.create(end, b"", ephemeral=True)
            try:
                with trio.CancelScope(shield=True):  # bounded by the store's op_timeout
                    await self.store.commit(t)
                return end
            except (BadVersionError, NoNodeError):
                continue
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._drop(end)
                raise

    async def _drop(self, end: str) -> None:
        try:
            await self.store.delete(end)
        except (NoNodeError, FsError):
            pass  # gone, or the store is away: an ephemeral znode goes with the session

    async def close_end(self, end: str) -> None:
        """Drop the open ``end`` (from :meth:`open_end`).  Never raises for
        a pipe or process that is gone."""
        await self._drop(end)

    async def write(self, pid: int, name: str, end: str, data: bytes, nonblocking: bool) -> int:
        """Post ``data`` as one message through the open ``end``.  EFBIG
        over PIPE_MSG_MAX; EPIPE once the pipe is closed or the pipe ``end``
        belongs to is removed; waits while the owner's ``pipe-bytes`` is
        full (EAGAIN if ``nonblocking``)."""
        if len(data) > PIPE_MSG_MAX:
            raise FsError(errno.EFBIG, f"a pipe message is at most {PIPE_MSG_MAX} bytes")
        L = self.layout
        path = L.pipe(pid, name)
        while True:
            with self.store.watching(L.quota(pid), path) as ev:
                got = await self.store.get(path, watch=True)
                if got is None or _state(got[0])["gone"]:
                    raise FsError(errno.EPIPE, f"pipe {name!r} of process {pid} is gone")
                kids, qgot = await gather(self.store.children(path), self.store.get(L.quota(pid), watch=True))
                if kids is None or end.rsplit("/", 1)[1] not in kids:
                    raise FsError(errno.EPIPE, f"pipe {name!r} of process {pid} is gone")
                if _state(got[0])["r"] and not _has(kids, READER):
                    raise FsError(errno.EPIPE, f"pipe {name!r} of process {pid} is closed (its reader went away)")
                t = self.store.transaction()
                t.check(path, got[1].version)  # no open since: the readers listed are all there are
                t.check(end, 0)
                t.create(f"{path}/m-", bytes(data), sequence=True)
                if qgot is not None:
                    charged = charge_pipe(pid, Quota.from_json(qgot[0]), len(data))
                    if charged is None:
                        if nonblocking:
                            raise FsError(errno.EAGAIN, f"the pipes of process {pid} are full (limit {PIPE_BYTES})")
                        await ev.wait()
                        continue
                    t.set_data(L.quota(pid), charged.to_json(), qgot[1].version)
                try:
                    await self.store.commit(t)
                    return len(data)
                except (BadVersionError, NoNodeError):
                    continue

    async def read(self, pid: int, name: str, end: str, count: int, nonblocking: bool) -> bytes:
        """Take the oldest message (its first ``count`` bytes) through the
        open ``end``, blocking until one arrives; b"" at EOF (had a writer,
        none left, nothing to read).  ENOENT once the pipe ``end`` belongs
        to is removed; EAGAIN when ``nonblocking`` and there is nothing yet.
        Cancelling while it waits takes nothing; a message being taken is
        taken whole and returned (as cloudfs.waits)."""
        L = self.layout
        path = L.pipe(pid, name)
        gone = FsError(errno.ENOENT, f"pipe {name!r} of process {pid} was removed")
        while True:
            with self.store.watching(path) as ev:
                before = await self.store.get(path)
                kids = await self.store.children(path, watch=True)
                if before is None or kids is None or end.rsplit("/", 1)[1] not in kids:
                    raise gone
                again = False
                for m in sorted(k for k in kids if k.startswith("m-")):
                    got, quota = await gather(self.store.get(f"{path}/{m}"), self.quotas.get(pid))
                    if got is None:
                        continue  # taken by another read
                    t = self.store.transaction()
                    t.delete(f"{path}/{m}", got[1].version)
                    if quota is not None:
                        t.set_data(L.quota(pid), quota.value.using(pipe_bytes=-cost(len(got[0]))).to_json(),
                                   quota.version)
                    try:
                        with trio.CancelScope(shield=True):  # bounded by the store's op_timeout
                            await self.store.commit(t)
                    except NoNodeError:
                        continue  # taken by another read
                    except BadVersionError:
                        again = True  # the quota moved (a write): take this same message again
                        break
                    return got[0][:count]
                if again:
                    continue
                if not _has(kids, WRITER) and _state(before[0])["w"]:
                    after = await self.store.get(path)
                    if after is None:
                        raise gone
                    if after[1].version == before[1].version:  # no open between: the listing holds
                        return b""
                    continue
                if nonblocking:
                    raise FsError(errno.EAGAIN, f"pipe {name!r} of process {pid} has nothing to read")
                await ev.wait()
