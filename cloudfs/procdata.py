"""A process's data: its user-data and its env key/value space, one znode
each (``proc/<pid>/userdata``, ``proc/<pid>/env/<key>``).

Writes follow the files' rules (docs/namespace.md): a write at offset 0
replaces the value, a write at a later offset splices into it (a large
write split by the kernel), each a compare-and-set on the znode's version.
An env write or unset changes the key and the process's quota counts
(cloudfs.quotas: ``env-keys``, ``env-bytes``) in one multi.  Env keys must
be checked by the caller (cloudfs.nodes.valid_key) before they reach a
znode path.  Errors are FsError: ENOENT (no such process, or an unset key
where one must be set), EFBIG (value over its limit), EDQUOT (over the
process's env quota), EAGAIN (nonblocking read of an unset key), plus the
store's EAGAIN/EIO.
"""

from __future__ import annotations

import errno

from ninep.errors import FsError

from .gather import gather
from .quotas import Quotas, charge_env, release_env
from .records import no_process
from .store import BadVersionError, NodeExistsError, NoNodeError, Store
from .znodes import ENV_VALUE_MAX, USERDATA_MAX, Layout


class ProcData:
    """User-data and env of the deployment's processes."""

    def __init__(self, store: Store, layout: Layout, quotas: Quotas):
        self.store = store
        self.layout = layout
        self.quotas = quotas

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
            return await self.store.wait_set(self.layout.env_key(pid, key), self.layout.env(pid), key, nonblocking)
        except FsError as e:
            if e.errno == errno.EAGAIN and nonblocking:
                raise FsError(errno.EAGAIN, f"env key {key!r} of process {pid} is not set") from None
            if e.errno == errno.ENOENT:
                raise no_process(pid) from None
            raise

    async def env_write(self, pid: int, key: str, offset: int, data: bytes) -> int:
        """Set (offset 0) or extend ``key``; creates it.  EFBIG above
        ENV_VALUE_MAX, EDQUOT beyond the process's env quota."""
        if offset + len(data) > ENV_VALUE_MAX:
            raise FsError(errno.EFBIG, f"an env value is limited to {ENV_VALUE_MAX} bytes")
        L = self.layout
        path = L.env_key(pid, key)
        while True:
            got, quota = await gather(self.store.get(path), self.quotas.get(pid))
            old = got[0] if got is not None else None
            new = bytes(data) if offset == 0 else (old or b"")[:offset].ljust(offset, b"\0") + data
            t = self.store.transaction()
            if got is None:
                t.create(path, new)
            else:
                t.set_data(path, new, got[1].version)
            if quota is not None:
                charged = charge_env(pid, quota.value, None if old is None else len(old), len(new))
                t.set_data(L.quota(pid), charged.to_json(), quota.version)
            try:
                await self.store.commit(t)
                return len(data)
            except (BadVersionError, NodeExistsError):
                continue
            except NoNodeError:
                if await self.store.exists(L.record(pid)) is None:
                    raise no_process(pid) from None
                continue  # the key was unset meanwhile

    async def env_unset(self, pid: int, key: str) -> None:
        """Remove ``key`` (and its bytes from the process's quota); ENOENT if
        it is not set."""
        L = self.layout
        path = L.env_key(pid, key)
        while True:
            got, quota = await gather(self.store.get(path), self.quotas.get(pid))
            if got is None:
                raise FsError(errno.ENOENT, f"env key {key!r} is not set")
            t = self.store.transaction()
            t.delete(path, got[1].version)
            if quota is not None:
                t.set_data(L.quota(pid), release_env(quota.value, len(got[0])).to_json(), quota.version)
            try:
                await self.store.commit(t)
                return
            except (BadVersionError, NoNodeError):
                continue

    # -- the write rule -------------------------------------------------------

    async def _write(self, path: str, offset: int, data: bytes, limit: int, what: str, pid: int) -> int:
        if offset + len(data) > limit:
            raise FsError(errno.EFBIG, f"{what} is limited to {limit} bytes")
        while True:
            if offset == 0:
                new, version = bytes(data), -1
            else:
                got = await self.store.get(path)
                if got is None:
                    raise no_process(pid)
                cur, version = got[0], got[1].version
                new = cur[:offset].ljust(offset, b"\0") + data
            try:
                await self.store.set(path, new, version)
                return len(data)
            except BadVersionError:
                continue
            except NoNodeError:
                raise no_process(pid) from None
