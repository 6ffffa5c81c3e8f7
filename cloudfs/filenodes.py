"""The nodes of ``/files`` (tree kinds FILES, FILEDIR, FILE): ordinary
files and directories over cloudfs.sharedfiles, with true sizes and mtimes.

Unlike the synthetic files elsewhere in the tree, reads and writes go to the
file's bytes at their offsets; ``getattr`` reports the backend's size and
mtime, and the qid version follows the mtime (cloudfs.tree.file_qid).
"""

from __future__ import annotations

import errno
import os
import stat

from ninep.errors import FsError
from ninep.fs import Attr, DirEntry, Node, OpenFile, SetAttr, StatFs

from . import tree
from .filestore import FileInfo, join
from .files import DirFile
from .nodes import CNode, View
from .sharedfiles import SharedHandle


def _node_for(view: View, path: str, info: FileInfo) -> CNode:
    return FilesDirNode(view, path, info) if info.is_dir else FileNode(view, path, info)


class _FilesNode(CNode):
    """Base: ``path`` below /files (``""`` for /files itself)."""

    def __init__(self, view: View, path: str, info: FileInfo | None = None):
        super().__init__(view)
        self.path = path
        self.shared = view.fs.files
        if info is not None:
            self._qid = tree.file_qid(info.is_dir, path, info.mtime_ns)

    def _where(self) -> str:
        return f"/files/{self.path}" if self.path else "/files"

    async def getattr(self) -> Attr:
        info = await self.shared.backend.info(self.path)
        if self.path:
            self._qid = tree.file_qid(info.is_dir, self.path, info.mtime_ns)
        mode = self.mode if info.is_dir == stat.S_ISDIR(self.mode) else tree.mode_of(
            tree.FILEDIR if info.is_dir else tree.FILE)
        t = info.mtime_ns
        return Attr(qid=self._qid, mode=mode, size=info.size, nlink=2 if info.is_dir else 1,
                    blocks=(info.size + 511) // 512, atime_ns=t, mtime_ns=t, ctime_ns=t,
                    uname="cloudfs", gname="cloudfs", muid=str(info.owner))

    async def setattr(self, change: SetAttr) -> None:
        if change.mode is not None or change.uid is not None or change.gid is not None:
            raise FsError(errno.EPERM, f"{self._where()}: modes and owners are fixed (the tree's rules decide)")
        if change.size is not None:
            if stat.S_ISDIR(self.mode):
                raise FsError(errno.EISDIR, f"{self._where()} is a directory")
            await self.shared.truncate(self.view, self.path, change.size)
        if change.mtime_ns is not None and self.path:
            await self.shared.touch(self.view, self.path, change.mtime_ns)

    async def statfs(self) -> StatFs:
        usage = await self.shared.usage()
        from .quotas import FILE_BYTES, FILES

        total = usage.limits[FILE_BYTES] // 4096
        free = max(0, usage.limits[FILE_BYTES] - usage.used[FILE_BYTES]) // 4096
        return StatFs(bsize=4096, blocks=total, bfree=free, bavail=free, files=usage.limits[FILES],
                      ffree=max(0, usage.limits[FILES] - usage.used[FILES]), namelen=255)


class FilesDirNode(_FilesNode):
    """``/files`` and every directory below it."""

    kind = tree.FILEDIR

    def __init__(self, view: View, path: str = "", info: FileInfo | None = None):
        if not path:
            self.kind = tree.FILES
        super().__init__(view, path, info)

    async def walk(self, name: str) -> Node:
        path = join(self.path, name)
        return _node_for(self.view, path, await self.shared.backend.info(path))

    async def open(self, flags: int) -> OpenFile:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise FsError(errno.EISDIR, f"{self._where()} is a directory")
        await self.shared.backend.info(self.path)
        return DirFile(self._entries, flags)

    async def _entries(self) -> list[DirEntry]:
        out = []
        for name, info in await self.shared.backend.list(self.path):
            child = f"{self.path}/{name}" if self.path else name
            kind = tree.FILEDIR if info.is_dir else tree.FILE
            out.append(DirEntry(name, tree.file_qid(info.is_dir, child, info.mtime_ns), tree.mode_of(kind)))
        return out

    async def create(self, name: str, mode: int, flags: int, uid: int, gid: int) -> tuple[Node, OpenFile]:
        if not stat.S_ISREG(mode) and stat.S_IFMT(mode):
            raise FsError(errno.EPERM, "/files holds only directories and regular files")
        path = join(self.path, name)
        h = await self.shared.open(self.view, path, write=True, create=True, exclusive=bool(flags & os.O_EXCL),
                                   truncate=bool(flags & os.O_TRUNC))
        # the file as opened (a move right after cannot make the create fail)
        return FileNode(self.view, path, h.info), FilesFile(h, flags)

    async def mkdir(self, name: str, mode: int, uid: int, gid: int) -> Node:
        path = join(self.path, name)
        await self.shared.mkdir(self.view, path)
        return FilesDirNode(self.view, path, await self.shared.backend.info(path))

    async def unlink(self, name: str, is_dir: bool) -> None:
        await self.shared.remove(self.view, join(self.path, name), is_dir)

    async def rename(self, name: str, newdir: Node, newname: str) -> None:
        if not isinstance(newdir, FilesDirNode) or newdir.view.fs is not self.view.fs:
            raise FsError(errno.EXDEV, "files move only within /files")
        await self.shared.rename(self.view, join(self.path, name), join(newdir.path, newname))

    async def symlink(self, name: str, target: str, uid: int, gid: int) -> Node:
        raise FsError(errno.EPERM, "/files holds only directories and regular files")

    async def mknod(self, name: str, mode: int, rdev: int, uid: int, gid: int) -> Node:
        raise FsError(errno.EPERM, "/files holds only directories and regular files")


class FileNode(_FilesNode):
    """A regular file below /files."""

    kind = tree.FILE

    async def open(self, flags: int) -> OpenFile:
        acc = flags & os.O_ACCMODE
        write = acc in (os.O_WRONLY, os.O_RDWR)
        h = await self.shared.open(self.view, self.path, write=write, truncate=bool(flags & os.O_TRUNC) and write)
        return FilesFile(h, flags)


class FilesFile(OpenFile):
    """One open of a /files file (reads and writes at offsets)."""

    def __init__(self, handle: SharedHandle, flags: int):
        super().__init__(flags)
        self.handle = handle

    async def read(self, offset: int, count: int) -> bytes:
        if self.flags & os.O_ACCMODE == os.O_WRONLY:
            raise FsError(errno.EBADF, "not open for reading")
        return await self.handle.read(offset, count)

    async def write(self, offset: int, data: bytes) -> int:
        if self.flags & os.O_ACCMODE == os.O_RDONLY:
            raise FsError(errno.EBADF, "not open for writing")
        return await self.handle.write(offset, data)

    async def fsync(self) -> None:
        await self.handle.sync()

    async def flush(self) -> None:
        await self.handle.flush()

    async def release(self) -> None:
        await self.handle.close()
