"""Named pipes of a process (RACK's pipes, with Plan 9 pipe(3) message
semantics), kept in ZooKeeper so writers and the reader may be on
different daemons.

Znodes, under the owner process::

    proc/<pid>/pipe                    made with the process's first pipe
    proc/<pid>/pipe/<name>             JSON {"w": had a writer, "c": closed}
    proc/<pid>/pipe/<name>/m-<seq>     one message (≤ PIPE_MSG_MAX bytes)
    proc/<pid>/pipe/<name>/w-<seq>     ephemeral: one open for writing
    proc/<pid>/pipe/<name>/r-<seq>     ephemeral: one open for reading

Each write is one message, created sequentially, so one writer's messages
arrive in order; a read takes the oldest message whole (a read shorter than
the message gets its start, and the rest is dropped, as Plan 9's message
pipes do).  Reads block until a message arrives; a read returns 0 bytes
(EOF) once the pipe has had a writer, no open for writing remains and no
message is left.  Opens are ephemeral znodes of the serving daemon's
ZooKeeper session: a writer whose connection or daemon goes away stops
counting (at once on a clean close or a dropped connection, within the
session timeout when a daemon dies).  When the last open for reading is
closed the pipe is closed for good: writes, and new opens, fail with EPIPE.

Quotas (cloudfs.quotas) of the owner: ``pipes`` (how many it may have) and
``pipe-bytes`` (bytes of messages not yet read, in all its pipes): a write
that would pass ``pipe-bytes`` waits until the reader makes room (EAGAIN
with O_NONBLOCK), as a full pipe does.

Errors are FsError: EEXIST, ENOENT (no such pipe or process), EPIPE, EFBIG
(a write over PIPE_MSG_MAX), EAGAIN (a nonblocking read with nothing to
read, a nonblocking write with no room, ``pipes`` exceeded), EINVAL (bad
name), EIO (a corrupt znode, or the store's EIO).
"""

from __future__ import annotations

import errno
import json
import logging

import trio

from ninep.errors import FsError

from .gather import gather
from .quotas import PIPE_BYTES, PIPES, Quota, Quotas
from .records import no_process
from .store import BadVersionError, NodeExistsError, NoNodeError, NotEmptyError, Store
from .znodes import Layout

log = logging.getLogger(__name__)

#: The largest message (one write), in bytes.
PIPE_MSG_MAX = 64 * 1024
WRITER, READER = "w", "r"


def _state(data: bytes) -> dict:
    try:
        st = json.loads(data or b"{}")
    except ValueError:
        raise FsError(errno.EIO, "corrupt pipe znode") from None
    if not isinstance(st, dict):
        raise FsError(errno.EIO, "corrupt pipe znode")
    return {"w": bool(st.get("w")), "c": bool(st.get("c"))}


def _encode(st: dict) -> bytes:
    return json.dumps({"w": int(st["w"]), "c": int(st["c"])}, separators=(",", ":")).encode()


def charge_pipe(pid: int, q: Quota, size: int) -> Quota | None:
    """``q`` after a message of ``size`` bytes waits in ``pid``'s pipes, or
    None when that would pass ``pipe-bytes`` now (the writer waits).
    FsError(EFBIG) if it is bigger than the whole limit."""
    if size > q.limits[PIPE_BYTES]:
        raise FsError(errno.EFBIG, f"a message of {size} bytes is over process {pid}'s limit {PIPE_BYTES}")
    if q.used[PIPE_BYTES] + size > q.limits[PIPE_BYTES]:
        return None
    return q.using(pipe_bytes=size)


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
            t.create(L.pipe(pid, name), _encode({"w": False, "c": False}))
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
            except NoNodeError:
                try:
                    await self.store.create(L.pipes(pid), b"")
                except NodeExistsError:
                    pass
                except NoNodeError:
                    raise no_process(pid) from None

    async def remove(self, pid: int, name: str) -> None:
        """Delete the pipe, its messages and its opens (they then fail with
        EPIPE), giving its bytes and its count back to the owner's quota.
        ENOENT if there is no such pipe."""
        L = self.layout
        path = L.pipe(pid, name)
        while True:
            kids, quota = await gather(self.store.children(path), self.quotas.get(pid))
            if kids is None:
                raise FsError(errno.ENOENT, f"no pipe {name!r} of process {pid}")
            sizes = 0
            t = self.store.transaction()
            for k in kids:
                if k.startswith("m-"):
                    got = await self.store.get(f"{path}/{k}")
                    sizes += len(got[0]) if got is not None else 0
                t.delete(f"{path}/{k}")
            t.delete(path)
            if quota is not None:
                t.set_data(L.quota(pid), quota.value.using(pipes=-1, pipe_bytes=-sizes).to_json(), quota.version)
            try:
                await self.store.commit(t)
                return
            except (BadVersionError, NoNodeError, NotEmptyError):
                continue

    async def open_end(self, pid: int, name: str, kind: str) -> str:
        """Count one open of the pipe for writing (``kind`` WRITER) or
        reading (READER): an ephemeral znode of this daemon's session, whose
        path is returned (give it to :meth:`close_end`).  ENOENT if there is
        no such pipe, EPIPE if it is closed."""
        L = self.layout
        path = L.pipe(pid, name)
        while True:
            got = await self.store.get(path)
            if got is None:
                if await self.store.exists(L.record(pid)) is None:
                    raise no_process(pid)
                raise FsError(errno.ENOENT, f"no pipe {name!r} of process {pid}")
            st = _state(got[0])
            if st["c"]:
                raise FsError(errno.EPIPE, f"pipe {name!r} of process {pid} is closed (its reader went away)")
            t = self.store.transaction()
            t.set_data(path, _encode({**st, "w": st["w"] or kind == WRITER}), got[1].version)
            t.create(f"{path}/{kind}-", b"", ephemeral=True, sequence=True)
            try:
                results = await self.store.commit(t)
                return results[1]
            except (BadVersionError, NoNodeError):
                continue

    async def close_end(self, pid: int, name: str, end: str, kind: str) -> None:
        """Drop the open ``end`` (from :meth:`open_end`); when it was the
        last open for reading, close the pipe for good.  Never raises for a
        pipe or process that is gone."""
        L = self.layout
        path = L.pipe(pid, name)
        try:
            await self.store.delete(end)
        except NoNodeError:
            pass
        if kind != READER:
            return
        while True:
            kids, got = await gather(self.store.children(path), self.store.get(path))
            if kids is None or got is None or any(k.startswith(f"{READER}-") for k in kids):
                return
            st = _state(got[0])
            if st["c"]:
                return
            try:
                await self.store.set(path, _encode({**st, "c": True}), got[1].version)
                return
            except BadVersionError:
                continue
            except NoNodeError:
                return

    async def write(self, pid: int, name: str, data: bytes, nonblocking: bool) -> int:
        """Post ``data`` as one message.  EFBIG over PIPE_MSG_MAX, EPIPE
        once the pipe is closed (or removed), waits while the owner's
        ``pipe-bytes`` is full (EAGAIN if ``nonblocking``)."""
        if len(data) > PIPE_MSG_MAX:
            raise FsError(errno.EFBIG, f"a pipe message is at most {PIPE_MSG_MAX} bytes")
        L = self.layout
        path = L.pipe(pid, name)
        while True:
            with self.store.watching(L.quota(pid), path) as ev:
                got, qgot = await gather(self.store.get(path, watch=True), self.store.get(L.quota(pid), watch=True))
                if got is None or _state(got[0])["c"]:
                    raise FsError(errno.EPIPE, f"pipe {name!r} of process {pid} is closed")
                t = self.store.transaction()
                t.check(path, got[1].version)
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

    async def read(self, pid: int, name: str, count: int, nonblocking: bool) -> bytes:
        """Take the oldest message (its first ``count`` bytes), blocking
        until one arrives; b"" at EOF (had a writer, none left, nothing to
        read).  ENOENT if the pipe is removed; EAGAIN when ``nonblocking``
        and there is nothing yet.  Cancelling while it waits takes nothing;
        a message being taken is taken whole and returned (as
        cloudfs.waits)."""
        L = self.layout
        path = L.pipe(pid, name)
        while True:
            with self.store.watching(path) as ev:
                kids = await self.store.children(path, watch=True)
                if kids is None:
                    raise FsError(errno.ENOENT, f"no pipe {name!r} of process {pid}")
                again = False
                for m in sorted(k for k in kids if k.startswith("m-")):
                    got, quota = await gather(self.store.get(f"{path}/{m}"), self.quotas.get(pid))
                    if got is None:
                        continue  # taken by another read
                    t = self.store.transaction()
                    t.delete(f"{path}/{m}", got[1].version)
                    if quota is not None:
                        t.set_data(L.quota(pid), quota.value.using(pipe_bytes=-len(got[0])).to_json(),
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
                if not any(k.startswith(f"{WRITER}-") for k in kids):
                    got = await self.store.get(path)
                    if got is None:
                        raise FsError(errno.ENOENT, f"no pipe {name!r} of process {pid}")
                    if _state(got[0])["w"]:
                        return b""
                if nonblocking:
                    raise FsError(errno.EAGAIN, f"pipe {name!r} of process {pid} has nothing to read")
                await ev.wait()
