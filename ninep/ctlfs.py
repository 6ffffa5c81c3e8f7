"""The synthetic ``ctl`` tree that diod serves for aname "ctl".

diod's tools attach aname ``ctl`` and expect these files (diod 1.0.24,
libnpfs/ctl.c ``np_ctl_initialize`` and diod/ops.c):

- ``diodload`` (utils/diodload.c) opens ``zero`` O_RDONLY and ``null``
  O_WRONLY and loops pread(zero, msize, 0) / pwrite(null, msize, 0); with
  ``-g`` it walks to ``null`` and loops Tgetattr on that fid.
- ``diodcat`` reads any file until a read returns 0 bytes (so ``zero`` never ends).
- ``diodls`` opens the root, Tgetattr's it (must be S_IFDIR), Treaddir's it,
  and with ``-l`` walks + getattrs each entry.
- ``dioddate`` reads ``date``: ``"SEC.USEC MINUTESWEST.DSTTIME\\n"``.

Semantics copied from diod: ``zero``/``zero100`` answer every read with
``count`` zero bytes; ``null``/``null100`` swallow writes (counted here in
:attr:`CtlFS.null_bytes`) and read as empty; the ``…100`` variants wait 100 ms
per request; text files (``version``, ``date``, ``meminfo``, ``net.rpc.nfs``,
``exports``, and any extra providers) are produced at the first read of an
open and served from that snapshot.  Opening a file that is not a sink for
writing is EACCES, as in diod.  Files are mode 0444 (sinks 0666), directories
0555, size 0, qid.version 0, owner root.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Iterable, Sequence

import trio

from .errors import FsError
from .fs import Attr, DirEntry, FileSystem, Node, OpenFile, SnapshotFile, qid_type_for_mode
from .qid import Qid

__all__ = ["CtlFS", "CtlDir", "CtlFile", "VERSION", "CTL_QID_BASE"]

#: What ``ctl/version`` says (diod says ``diod-1.0.24``).
VERSION = "cloudfs-ninep-0.1.0"

#: Ctl qid paths start here so they never meet a LocalFS inode number in an
#: AnameMux (ninep.fs wants qid paths unique across the whole served tree).
CTL_QID_BASE = 0xC7_0000_0000_0000

_DELAY_S = 0.1


def _date_text() -> bytes:
    """diod's ``date``: gettimeofday as ``"%lu.%lu %d.%d\\n"`` (sec, usec,
    then the kernel timezone's minutes west and dst flag, which Linux leaves
    at ``0.0`` unless something called settimeofday with a timezone)."""
    ns = time.time_ns()
    return f"{ns // 1_000_000_000}.{ns // 1000 % 1_000_000} 0.0\n".encode()


def _proc_text(name: str) -> Callable[[], bytes]:
    """A producer reading ``/proc/<name with '.' as '/'>`` (diod's _ctl_get_proc)."""
    path = "/proc/" + name.replace(".", "/")

    def produce() -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise FsError(e.errno or errno.EIO, e.strerror) from None

    return produce


class CtlNode(Node):
    """A node of the ctl tree: a name, a fixed qid and a mode."""

    def __init__(self, fs: CtlFS, name: str, path: int, mode: int):
        self.fs = fs
        self.name = name
        self.mode = mode
        self._qid = Qid(qid_type_for_mode(mode), 0, path)

        t = fs.started_ns
        self._attr = Attr(qid=self._qid, mode=mode, size=0, nlink=1, atime_ns=t, mtime_ns=t, ctime_ns=t,
                          uname="root", gname="root", muid="root")

    def qid(self) -> Qid:
        return self._qid

    async def getattr(self) -> Attr:
        """Fixed attributes: owner root, size 0, times of the tree's creation."""
        return self._attr


class CtlFile(CtlNode):
    """A ctl file.  ``kind`` is ``"zero"`` (endless zeros), ``"null"`` (a sink)
    or ``"text"`` (content from ``produce()``, bytes); ``delay`` waits 100 ms
    per read/write like diod's ``zero100``/``null100``."""

    def __init__(self, fs: CtlFS, name: str, path: int, kind: str,
                 produce: Callable[[], bytes] | None = None, delay: bool = False):
        mode = stat.S_IFREG | (0o666 if kind == "null" else 0o444)
        super().__init__(fs, name, path, mode)
        self.kind = kind
        self.produce = produce
        self.delay = delay

    async def open(self, flags: int) -> OpenFile:
        """EACCES when opening for writing anything but a sink (diod's np_ctl_lopen)."""
        if flags & os.O_ACCMODE != os.O_RDONLY and self.kind != "null":
            raise FsError(errno.EACCES, f"{self.name} is read-only")
        if self.kind == "zero":
            return _ZeroOpen(self, flags)
        if self.kind == "null":
            return _NullOpen(self, flags)
        return _TextOpen(self, flags)


class _ZeroOpen(OpenFile):
    def __init__(self, file: CtlFile, flags: int):
        super().__init__(flags)
        self.file = file

    async def read(self, offset: int, count: int) -> bytes:
        if self.file.delay:
            await trio.sleep(_DELAY_S)
        return bytes(count)


class _NullOpen(OpenFile):
    def __init__(self, file: CtlFile, flags: int):
        super().__init__(flags)
        self.file = file

    async def read(self, offset: int, count: int) -> bytes:
        if self.file.delay:
            await trio.sleep(_DELAY_S)
        return b""

    async def write(self, offset: int, data: bytes) -> int:
        if self.file.delay:
            await trio.sleep(_DELAY_S)
        fs = self.file.fs
        fs.null_bytes += len(data)
        fs.null_writes += 1
        return len(data)


class _TextOpen(SnapshotFile):
    def __init__(self, file: CtlFile, flags: int):
        super().__init__(flags)
        self.file = file

    async def produce(self) -> bytes:
        assert self.file.produce is not None
        return self.file.produce()


class CtlDir(CtlNode):
    """The ctl root directory: a fixed list of :class:`CtlFile` children."""

    def __init__(self, fs: CtlFS, path: int):
        super().__init__(fs, "", path, stat.S_IFDIR | 0o555)
        self.children: dict[str, CtlFile] = {}

    async def walk(self, name: str) -> Node:
        """The ctl file ``name``; ENOENT if there is none."""
        try:
            return self.children[name]
        except KeyError:
            raise FsError(errno.ENOENT, f"no file {name!r} in ctl") from None

    async def open(self, flags: int) -> OpenFile:
        """Read-only (EISDIR otherwise); readdir lists the files in creation order."""
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise FsError(errno.EISDIR, "is a directory")
        return _DirOpen(self, flags)


class _DirOpen(OpenFile):
    def __init__(self, d: CtlDir, flags: int):
        super().__init__(flags)
        self.d = d

    async def read(self, offset: int, count: int) -> bytes:
        raise FsError(errno.EISDIR, "is a directory")

    async def readdir(self) -> Sequence[DirEntry]:
        return [DirEntry(f.name, f.qid(), f.mode) for f in self.d.children.values()]


class CtlFS(FileSystem):
    """diod's ``ctl`` tree (see the module doc) for any aname.

    ``exports`` are the lines of the ``exports`` file (diod writes
    ``"PATH OPTS USERS HOSTS"``; we write ``"PATH - - -"``); ``providers`` adds
    text files: name → zero-argument callable returning bytes (e.g. a server's
    ``connections``), called at the first read of each open; it may raise
    FsError.  ``version`` is the content of ``version`` (without newline).

    Counters: :attr:`null_bytes`, :attr:`null_writes` (writes swallowed by
    ``null``/``null100``).
    """

    def __init__(self, *, version: str = VERSION, exports: Iterable[str] = (),
                 providers: dict[str, Callable[[], bytes]] | None = None):
        self.started_ns = time.time_ns()
        self.null_bytes = 0
        self.null_writes = 0
        self.root = CtlDir(self, CTL_QID_BASE)
        export_text = "".join(f"{e} - - -\n" for e in exports).encode()
        files: list[tuple[str, str, Callable[[], bytes] | None, bool]] = [
            ("version", "text", lambda: f"{version}\n".encode(), False),
            ("date", "text", _date_text, False),
            ("zero", "zero", None, False),
            ("zero100", "zero", None, True),
            ("null", "null", None, False),
            ("null100", "null", None, True),
            ("meminfo", "text", _proc_text("meminfo"), False),
            ("net.rpc.nfs", "text", _proc_text("net.rpc.nfs"), False),
            ("exports", "text", lambda: export_text, False),
        ]
        for name, fn in (providers or {}).items():
            files.append((name, "text", fn, False))
        for i, (name, kind, fn, delay) in enumerate(files, start=1):
            if "/" in name or name in ("", ".", ".."):
                raise ValueError(f"bad ctl file name {name!r}")
            self.root.children[name] = CtlFile(self, name, CTL_QID_BASE + i, kind, fn, delay)

    async def attach(self, uname: str, aname: str, n_uname: int | None = None) -> Node:
        """The ctl root, whoever attaches (diod's ctl needs no credentials)."""
        return self.root
