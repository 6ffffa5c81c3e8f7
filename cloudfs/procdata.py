"""A process's data: its user-data and its env key/value space, one znode
each (``proc/<pid>/userdata``, ``proc/<pid>/env/<key>``).

Writes follow the files' rules (docs/namespace.md): a write at offset 0
replaces the value, a write at a later offset splices into it (a large
write split by the kernel), each a compare-and-set on the znode's version.
Env keys must be checked by the caller (cloudfs.nodes.valid_key) before
they reach a znode path.  Errors are FsError: ENOENT (no such process, or
an unset key where one must be set), EFBIG (value over its limit), EAGAIN
(nonblocking read of an unset key), plus the store's EAGAIN/EIO.
"""

from __future__ import annotations

import errno

from ninep.errors import FsError

from .records import no_process
from .store import BadVersionError, NodeExistsError, NoNodeError, Store
from .znodes import ENV_VALUE_MAX, USERDATA_MAX, Layout


class ProcData:
    """User-data and env of the deployment's processes."""

    def __init__(self, store: Store, layout: Layout):
        self.store = store
        self.layout = layout

    # -- userdata -----------------------------------------------------------

    async def userdata(self, pid: int) -> bytes:
        """The user-data bytes of ``pid``; ENOENT if no such process."""
        got = await self.store.get(self.layout.userdata(pid))
        if got is None:
            raise no_process(pid)
        return got[0]

    async def write_userdata(self, pid: int, offset: int, data: bytes) -> int:
        """Write at ``offset``: offset 0 replaces, a later offset splices into
        the current value.  Returns ``len(data)``; EFBIG above USERDATA_MAX
        bytes in all."""
        return await self._write(self.layout.userdata(pid), offset, data, USERDATA_MAX, "userdata", pid)

    # -- env ----------------------------------------------------------------

    async def env_keys(self, pid: int) -> list[str]:
        """The keys set for ``pid``, sorted; ENOENT if no such process."""
        names = await self.store.children(self.layout.env(pid))
        if names is None:
            raise no_process(pid)
        return sorted(names)

    async def env_wait(self, pid: int, key: str, nonblocking: bool) -> bytes:
        """The value of ``key``, blocking (ZooKeeper watch) until it is set.
        EAGAIN when ``nonblocking`` and unset; ENOENT if there is no such
        process or it ends while the read waits."""
        try:
            return await self.store.wait_set(self.layout.env_key(pid, key), nonblocking,
                                             gone=self.layout.record(pid))
        except FsError as e:
            if e.errno == errno.EAGAIN and nonblocking:
                raise FsError(errno.EAGAIN, f"env key {key!r} of process {pid} is not set") from None
            if e.errno == errno.ENOENT:
                raise no_process(pid) from None
            raise

    async def env_write(self, pid: int, key: str, offset: int, data: bytes) -> int:
        """Set (offset 0) or extend ``key``; creates it; EFBIG above ENV_VALUE_MAX."""
        return await self._write(self.layout.env_key(pid, key), offset, data, ENV_VALUE_MAX,
                                 "an env value", pid, create=True)

    async def env_unset(self, pid: int, key: str) -> None:
        """Remove ``key``; ENOENT if it is not set."""
        try:
            await self.store.delete(self.layout.env_key(pid, key))
        except NoNodeError:
            raise FsError(errno.ENOENT, f"env key {key!r} is not set") from None

    # -- the write rule -------------------------------------------------------

    async def _write(self, path: str, offset: int, data: bytes, limit: int, what: str, pid: int,
                     create: bool = False) -> int:
        if offset + len(data) > limit:
            raise FsError(errno.EFBIG, f"{what} is limited to {limit} bytes")
        while True:
            if offset == 0:
                new, version = bytes(data), -1
            else:
                got = await self.store.get(path)
                if got is None:
                    if not create:
                        raise no_process(pid)
                    cur, version = b"", None
                else:
                    cur, version = got[0], got[1].version
                new = cur[:offset].ljust(offset, b"\0") + data
            if len(new) > limit:
                raise FsError(errno.EFBIG, f"{what} is limited to {limit} bytes")
            try:
                if version is None:
                    raise NoNodeError()
                await self.store.set(path, new, version)
                return len(data)
            except BadVersionError:
                continue
            except NoNodeError:
                if not create:
                    raise no_process(pid) from None
                try:
                    await self.store.create(path, new)
                    return len(data)
                except NodeExistsError:
                    continue
                except NoNodeError:
                    raise no_process(pid) from None
