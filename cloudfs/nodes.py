"""The nodes (files and directories) of the cloudfs tree.

Each class serves one kind of cloudfs.tree.TREE; its mode and qid come from
that table.  Nodes of a process check that the process still exists
(ENOENT once it has ended).  A node belongs to a :class:`View` (who attached),
which is how ``/proc/self`` resolves.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from dataclasses import dataclass

import trio
from typing import TYPE_CHECKING

from ninep.errors import FsError
from ninep.fs import Attr, DirEntry, Node, OpenFile
from ninep.qid import Qid

from . import tree
from .ctl import valid_name
from .pipes import READER, WRITER
from .znodes import parse_pid
from .files import (
    ChildrenFile, ConsoleFile, CtlFile, DirFile, EnvKeyFile, InfoFile, LimitsFile, NotepgFile, NoteFile, PipeFile,
    StatsFile, StatusFile, UserdataFile, WaitFile, console_of, kv_text,
)

if TYPE_CHECKING:
    from .namespace import CloudFS


#: Rights of a view (see :class:`View`).
OPERATOR, PROCESS, READONLY = "operator", "process", "readonly"


@dataclass(frozen=True)
class View:
    """Who a root was attached for, and what they may do.

    ``self_pid`` is the process ``/proc/self`` walks to (None: ``self`` is
    ENOENT).  ``rights``:

    - ``operator``: everything (the host's FUSE mount, the operator socket);
    - ``process``: as process ``self_pid``: write ``ctl``, ``userdata``,
      ``env`` and ``note``/``notepg`` of itself and its descendants, read
      their ``userdata`` and ``wait``, lower their ``limits``, make and
      remove their pipes; read its own ``note``, read its own pipes and
      write those of itself and its ancestors; read ``status``, ``children``,
      ``env`` and ``limits`` of every process, and ``/images``, ``/net``;
      read all of ``/files``, make entries anywhere in it and change those
      that it or its descendants made (cloudfs.sharedfiles);
    - ``readonly``: read ``status``, ``children``, ``env``, ``limits``,
      ``/images``, ``/net`` and ``/files``; nothing else.

    Anything not allowed fails with EACCES before it changes anything.
    """

    fs: "CloudFS"
    self_pid: int | None = None
    rights: str = OPERATOR

    async def may_modify(self, pid: int) -> None:
        """Raise FsError(EACCES) unless this view may write ``pid``'s ctl,
        userdata and env (and read its userdata and wait)."""
        if self.rights == OPERATOR:
            return
        if self.rights == PROCESS and self.self_pid is not None:
            if await self.fs.records.is_descendant(pid, self.self_pid):
                return
            raise FsError(errno.EACCES, f"process {self.self_pid} may only change itself and its descendants, "
                                        f"not process {pid}")
        raise FsError(errno.EACCES, "read-only view: attach with a process credential or as the operator")

    def may_take_notes(self, pid: int) -> None:
        """Raise FsError(EACCES) unless this view may read (take) ``pid``'s
        notes: the operator, or the process itself."""
        if self.rights == OPERATOR or (self.rights == PROCESS and self.self_pid == pid):
            return
        raise FsError(errno.EACCES, f"only process {pid} itself (or the operator) reads its notes")

    async def may_write_pipe(self, pid: int) -> None:
        """Raise FsError(EACCES) unless this view may write ``pid``'s pipes:
        the operator, the process itself, its descendants."""
        if self.rights == OPERATOR:
            return
        if self.rights == PROCESS and self.self_pid is not None \
                and await self.fs.records.is_descendant(self.self_pid, pid):
            return
        raise FsError(errno.EACCES, f"only process {pid}, its descendants and the operator write its pipes")

    def may_administer(self) -> None:
        """Raise FsError(EACCES) unless this is the operator (e.g. creating networks)."""
        if self.rights != OPERATOR:
            raise FsError(errno.EACCES, "only the operator may do this")


def _check_access(mode: int, flags: int) -> None:
    acc = flags & os.O_ACCMODE
    if stat.S_ISDIR(mode) and acc != os.O_RDONLY:
        raise FsError(errno.EISDIR, "is a directory")
    if acc in (os.O_RDONLY, os.O_RDWR) and not mode & 0o444:
        raise FsError(errno.EACCES, "file is write-only")
    if acc in (os.O_WRONLY, os.O_RDWR) and not mode & 0o222:
        raise FsError(errno.EACCES, "file is read-only")


def valid_key(name: str) -> None:
    """Env keys: 1–255 bytes of UTF-8, no '/', NUL or control characters
    (names that are not UTF-8 reach file code with surrogate escapes: they
    are refused too).  Raises FsError(EINVAL) or FsError(ENAMETOOLONG)."""
    if not name or name in (".", ".."):
        raise FsError(errno.EINVAL, "empty env key")
    if len(name) > 255:
        raise FsError(errno.ENAMETOOLONG, "env key longer than 255 bytes")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise FsError(errno.EINVAL, "env keys are UTF-8") from None
    if size > 255:
        raise FsError(errno.ENAMETOOLONG, "env key longer than 255 bytes")
    if any(c == "/" or ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name):
        raise FsError(errno.EINVAL, f"bad env key {name[:64]!r}")


class CNode(Node):
    """Base: ``kind`` from cloudfs.tree; ``pid``/``key`` make the qid."""

    kind = 0
    #: Writing needs View.may_modify(pid) (ctl, userdata, env keys).
    guarded_write = False
    #: Reading needs View.may_modify(pid) too (userdata, wait: private or consuming).
    guarded_read = False

    def __init__(self, view: View, pid: int = 0, key: str = ""):
        self.view = view
        self.fs = view.fs
        self.pid = pid
        self.key = key
        self.mode = tree.mode_of(self.kind)
        self._qid = tree.qid_of(self.kind, pid, key)
        self._attr: Attr | None = None
        self._children: dict[str, Node] = {}  # fixed-name children, made once (root dirs, a pid's files)

    def qid(self) -> Qid:
        return self._qid

    async def _alive(self) -> None:
        if self.pid and not await self.fs.records.exists(self.pid):
            raise FsError(errno.ENOENT, f"no process {self.pid}")

    async def getattr(self) -> Attr:
        await self._alive()
        if self._attr is None:  # synthetic files: fixed attributes (size 0, the daemon's start time)
            t = self.fs.started_ns
            self._attr = Attr(qid=self._qid, mode=self.mode, nlink=2 if stat.S_ISDIR(self.mode) else 1,
                              atime_ns=t, mtime_ns=t, ctime_ns=t, uname="cloudfs", gname="cloudfs")
        return self._attr

    async def open(self, flags: int) -> OpenFile:
        _check_access(self.mode, flags)
        await self._alive()
        acc = flags & os.O_ACCMODE
        writes = acc in (os.O_WRONLY, os.O_RDWR) or bool(flags & os.O_TRUNC)
        if (writes and not stat.S_ISDIR(self.mode)) or (self.guarded_read and acc != os.O_WRONLY):
            if self.pid and (self.guarded_write or self.guarded_read):
                await self.view.may_modify(self.pid)
            elif writes:
                self.view.may_administer()
        return self._open(flags)

    def _open(self, flags: int) -> OpenFile:
        return DirFile(self._entries, flags)

    async def _entries(self) -> list[DirEntry]:
        return []

    def _entry(self, name: str, node: "CNode") -> DirEntry:
        return DirEntry(name, node.qid(), node.mode)


class RootNode(CNode):
    """``/``: proc, images, net, hosts, and files when the CloudFS has a files backend."""

    kind = tree.ROOT

    def _dirs(self) -> list[tuple[str, int]]:
        return [(n, k) for n, k in tree.ROOT_DIRS if k != tree.FILES or self.fs.files is not None]

    def _dir(self, kind: int) -> "CNode":
        if kind == tree.FILES:
            from .filenodes import FilesDirNode  # it builds on this module

            return FilesDirNode(self.view)
        return _DIRS[kind](self.view)

    async def walk(self, name: str) -> Node:
        node = self._children.get(name)
        if node is None:
            kind = dict(self._dirs()).get(name)
            if kind is None:
                raise FsError(errno.ENOENT, f"no {name!r} in /")
            node = self._children[name] = self._dir(kind)
        return node

    async def _entries(self) -> list[DirEntry]:
        return [self._entry(n, self._dir(k)) for n, k in self._dirs()]


class ProcNode(CNode):
    """``/proc``: a directory per live pid; ``self`` walks to the view's pid."""

    kind = tree.PROC

    async def walk(self, name: str) -> Node:
        if name == "self":
            if self.view.self_pid is None:
                raise FsError(errno.ENOENT, "no /proc/self: attached as the operator")
            pid = self.view.self_pid
        else:
            pid = parse_pid(name)
            if pid is None:
                raise FsError(errno.ENOENT, f"no process {name!r}")
        node = PidNode(self.view, pid)
        await node._alive()
        return node

    async def _entries(self) -> list[DirEntry]:
        mode = tree.mode_of(tree.PID)
        return [DirEntry(str(p), tree.qid_of(tree.PID, p), mode) for p in await self.fs.records.pids()]


class PidNode(CNode):
    """``/proc/<pid>``: ctl status children userdata env wait."""

    kind = tree.PID

    async def walk(self, name: str) -> Node:
        node = self._children.get(name)
        if node is None:
            kind = dict(tree.PID_FILES).get(name)
            if kind is None:
                raise FsError(errno.ENOENT, f"no {name!r} in /proc/{self.pid}")
            node = self._children[name] = _PID_NODES[kind](self.view, self.pid)
        await self._alive()
        return node

    async def _entries(self) -> list[DirEntry]:
        return [self._entry(n, _PID_NODES[k](self.view, self.pid)) for n, k in tree.PID_FILES]


class CtlNode(CNode):
    kind = tree.CTL
    guarded_write = True

    async def setattr(self, change) -> None:
        await self.view.may_modify(self.pid)
        await super().setattr(change)

    def _open(self, flags: int) -> OpenFile:
        return CtlFile(self.fs, self.pid, flags)


class StatusNode(CNode):
    kind = tree.STATUS

    def _open(self, flags: int) -> OpenFile:
        return StatusFile(self.fs, self.pid, flags)


class ChildrenNode(CNode):
    kind = tree.CHILDREN

    def _open(self, flags: int) -> OpenFile:
        return ChildrenFile(self.fs, self.pid, flags)


class UserdataNode(CNode):
    """``/proc/<pid>/userdata``; truncating to 0 (``: > userdata``) clears it."""

    kind = tree.USERDATA
    guarded_write = guarded_read = True

    def _open(self, flags: int) -> OpenFile:
        return UserdataFile(self.fs, self.pid, flags)

    async def setattr(self, change) -> None:
        await self.view.may_modify(self.pid)
        await super().setattr(change)
        if change.size == 0:
            await self.fs.data.write_userdata(self.pid, 0, b"")


class LimitsNode(CNode):
    """``/proc/<pid>/limits``: everyone reads; the operator sets, a process
    (itself or an ancestor) may only lower."""

    kind = tree.LIMITS
    guarded_write = True

    async def setattr(self, change) -> None:
        await self.view.may_modify(self.pid)
        await super().setattr(change)

    def _open(self, flags: int) -> OpenFile:
        return LimitsFile(self.fs, self.pid, flags, only_lower=self.view.rights != OPERATOR)


class StatsNode(CNode):
    kind = tree.STATS

    def _open(self, flags: int) -> OpenFile:
        return StatsFile(self.fs, self.pid, flags)


class ConsoleNode(CNode):
    """``/proc/<pid>/console``: readable by the operator, the process and
    its ancestors (it is the user-data's output); ``stat`` gives its length."""

    kind = tree.CONSOLE
    guarded_read = True

    async def getattr(self) -> Attr:
        attr = await super().getattr()
        try:
            await self.view.may_modify(self.pid)
            return dataclasses.replace(attr, size=len(await console_of(self.fs, self.pid)))
        except FsError as e:
            if e.errno == errno.ENOENT:
                raise
            return attr  # not theirs to read (not even its length), or the driver cannot tell now

    def _open(self, flags: int) -> OpenFile:
        return ConsoleFile(self.fs, self.pid, flags)


class WaitNode(CNode):
    kind = tree.WAIT
    guarded_read = True

    def _open(self, flags: int) -> OpenFile:
        return WaitFile(self.fs, self.pid, flags)


class NoteNode(CNode):
    """``/proc/<pid>/note``: the operator, the process and its ancestors
    post (write); the process itself and the operator take (read)."""

    kind = tree.NOTE
    guarded_write = True

    async def open(self, flags: int) -> OpenFile:
        if flags & os.O_ACCMODE != os.O_WRONLY:
            self.view.may_take_notes(self.pid)
        return await super().open(flags)

    async def setattr(self, change) -> None:
        await self.view.may_modify(self.pid)
        await super().setattr(change)

    def _open(self, flags: int) -> OpenFile:
        return NoteFile(self.fs, self.pid, flags)


class NotepgNode(CNode):
    """``/proc/<pid>/notepg``: write-only; who may post to ``note`` may post here."""

    kind = tree.NOTEPG
    guarded_write = True

    async def setattr(self, change) -> None:
        await self.view.may_modify(self.pid)
        await super().setattr(change)

    def _open(self, flags: int) -> OpenFile:
        return NotepgFile(self.fs, self.pid, flags)


class PipeDirNode(CNode):
    """``/proc/<pid>/pipe``: its pipes; creating a file makes a pipe, ``rm``
    removes one (the process itself, its ancestors, the operator)."""

    kind = tree.PIPEDIR

    async def walk(self, name: str) -> Node:
        _pipe_name(name)
        if not await self.fs.pipes.exists(self.pid, name):
            await self._alive()
            raise FsError(errno.ENOENT, f"no pipe {name!r} of process {self.pid}")
        return PipeNode(self.view, self.pid, name)

    async def _entries(self) -> list[DirEntry]:
        return [self._entry(n, PipeNode(self.view, self.pid, n)) for n in await self.fs.pipes.names(self.pid)]

    async def create(self, name: str, mode: int, flags: int, uid: int, gid: int) -> tuple[Node, OpenFile]:
        _pipe_name(name)
        await self.view.may_modify(self.pid)
        await self.fs.pipes.create(self.pid, name)
        node = PipeNode(self.view, self.pid, name)
        return node, await node.open(flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC), lazy=True)

    async def unlink(self, name: str, is_dir: bool) -> None:
        if is_dir:
            raise FsError(errno.ENOTDIR, "pipes are files")
        _pipe_name(name)
        await self.view.may_modify(self.pid)
        await self.fs.pipes.remove(self.pid, name)


def _pipe_name(name: str) -> None:
    if not valid_name(name):
        raise FsError(errno.EINVAL, f"bad pipe name {name[:64]!r} (1-63 of letters, digits, '.', '_', '-')")


class PipeNode(CNode):
    """``/proc/<pid>/pipe/<name>``: the process, its descendants and the
    operator open it for writing; the process itself and the operator for
    reading.  Truncating (``exec 5>pipe``) changes nothing."""

    kind = tree.PIPE

    async def _alive(self) -> None:
        if not await self.fs.pipes.exists(self.pid, self.key):
            raise FsError(errno.ENOENT, f"no pipe {self.key!r} of process {self.pid}")

    async def setattr(self, change) -> None:
        if change.only_truncate_to_zero():
            return
        await super().setattr(change)

    async def _may(self, kind: str) -> None:
        if kind == WRITER:
            await self.view.may_write_pipe(self.pid)
        else:
            self.view.may_take_notes(self.pid)  # the same rule: the process itself, or the operator

    async def open(self, flags: int, lazy: bool = False) -> OpenFile:
        """``lazy`` (the open that made the pipe): its rights are checked,
        and it is counted as a reader or writer, only from its first read
        or write, so ``touch`` by an ancestor works and leaves no trace (a
        writer counted and gone would mean EOF)."""
        _check_access(self.mode, flags)
        if lazy:
            return PipeFile(self.fs, self.pid, self.key, flags, [], check=self._may)
        acc = flags & os.O_ACCMODE
        kinds = ([WRITER] if acc in (os.O_WRONLY, os.O_RDWR) else []) + \
            ([READER] if acc in (os.O_RDONLY, os.O_RDWR) else [])
        for kind in kinds:
            await self._may(kind)
        ends: list[tuple[str, str]] = []
        try:
            for kind in kinds:
                ends.append((await self.fs.pipes.open_end(self.pid, self.key, kind), kind))
        except BaseException:
            with trio.CancelScope(shield=True):
                await PipeFile(self.fs, self.pid, self.key, flags, ends).release()
            raise
        return PipeFile(self.fs, self.pid, self.key, flags, ends)


class EnvNode(CNode):
    """``/proc/<pid>/env``: every valid name walks (set or not); ``create``
    opens a key (the write sets it); ``unlink`` unsets (ENOENT if unset)."""

    kind = tree.ENV

    async def walk(self, name: str) -> Node:
        valid_key(name)
        await self._alive()
        return EnvKeyNode(self.view, self.pid, name)

    async def _entries(self) -> list[DirEntry]:
        return [self._entry(k, EnvKeyNode(self.view, self.pid, k)) for k in await self.fs.data.env_keys(self.pid)]

    async def create(self, name: str, mode: int, flags: int, uid: int, gid: int) -> tuple[Node, OpenFile]:
        valid_key(name)
        await self.view.may_modify(self.pid)
        node = EnvKeyNode(self.view, self.pid, name)
        return node, await node.open(flags)

    async def unlink(self, name: str, is_dir: bool) -> None:
        if is_dir:
            raise FsError(errno.ENOTDIR, "env keys are files")
        valid_key(name)
        await self.view.may_modify(self.pid)
        await self.fs.data.env_unset(self.pid, name)


class EnvKeyNode(CNode):
    kind = tree.ENVKEY
    guarded_write = True

    async def setattr(self, change) -> None:
        await self.view.may_modify(self.pid)
        await super().setattr(change)

    def _open(self, flags: int) -> OpenFile:
        return EnvKeyFile(self.fs, self.pid, self.key, flags)


class ImagesNode(CNode):
    """``/images``: a file per image the driver offers (cloudfs.catalog)."""

    kind = tree.IMAGES

    async def walk(self, name: str) -> Node:
        await self.fs.catalog.image(name)
        return ImageNode(self.view, 0, name)

    async def _entries(self) -> list[DirEntry]:
        return [self._entry(i.name, ImageNode(self.view, 0, i.name)) for i in await self.fs.catalog.images()]


class ImageNode(CNode):
    """``/images/<name>``: id name status size disk_format container_format
    (``-`` where the driver has none) checksum created."""

    kind = tree.IMAGE

    async def _alive(self) -> None:
        await self.fs.catalog.image(self.key)

    async def _info(self) -> bytes:
        i = await self.fs.catalog.image(self.key)
        return kv_text([("id", i.id), ("name", i.name), ("status", i.status), ("size", i.size),
                        ("disk_format", i.disk_format), ("container_format", i.container_format),
                        ("checksum", i.checksum), ("created", i.created)])

    def _open(self, flags: int) -> OpenFile:
        return InfoFile(self._info, flags)


class NetNode(CNode):
    """``/net``: a file per network; creating ``/net/<name>`` (open with
    O_CREAT, e.g. ``touch``) creates the network (the driver picks the cidr).
    EEXIST if it exists, EINVAL for a bad name, the driver's error (EIO)
    if it fails."""

    kind = tree.NET

    async def walk(self, name: str) -> Node:
        await self.fs.catalog.network(name)
        return NetFileNode(self.view, 0, name)

    async def _entries(self) -> list[DirEntry]:
        return [self._entry(n.name, NetFileNode(self.view, 0, n.name)) for n in await self.fs.catalog.networks()]

    async def create(self, name: str, mode: int, flags: int, uid: int, gid: int) -> tuple[Node, OpenFile]:
        self.view.may_administer()
        if not valid_name(name):
            raise FsError(errno.EINVAL, f"bad network name {name!r} (letters, digits, '.', '_', '-')")
        await self.fs.catalog.create_network(name)
        node = NetFileNode(self.view, 0, name)
        # The new file is read-only: the creating open reads, whatever its flags.
        return node, node._open(os.O_RDONLY)

    async def unlink(self, name: str, is_dir: bool) -> None:
        """``rm /net/<name>``: the operator deletes a network (EBUSY while a
        VM is on it)."""
        if is_dir:
            raise FsError(errno.ENOTDIR, "networks are files")
        self.view.may_administer()
        await self.fs.catalog.delete_network(name)


class NetFileNode(CNode):
    """``/net/<name>``: id name cidr status."""

    kind = tree.NETFILE

    async def _alive(self) -> None:
        await self.fs.catalog.network(self.key)

    async def _info(self) -> bytes:
        n = await self.fs.catalog.network(self.key)
        return kv_text([("id", n.id), ("name", n.name), ("cidr", n.cidr), ("status", n.status)])

    def _open(self, flags: int) -> OpenFile:
        return InfoFile(self._info, flags)

    async def setattr(self, change) -> None:
        if change.only_truncate_to_zero():  # `echo > /net/x` after create: nothing to truncate
            return
        await super().setattr(change)


class HostsNode(CNode):
    """``/hosts``: a file per live daemon of the deployment (cloudfs.hosts)."""

    kind = tree.HOSTS

    async def walk(self, name: str) -> Node:
        await self.fs.hosts.get(name)
        return HostNode(self.view, 0, name)

    async def _entries(self) -> list[DirEntry]:
        return [self._entry(n, HostNode(self.view, 0, n)) for n in await self.fs.hosts.names()]


class HostNode(CNode):
    """``/hosts/<name>``: name daemon driver scope since migrate processes."""

    kind = tree.HOST

    async def _alive(self) -> None:
        await self.fs.hosts.get(self.key)

    async def _info(self) -> bytes:
        h = await self.fs.hosts.get(self.key)
        pids = await self.fs.hosts.processes(h)
        return kv_text([("name", h.name), ("daemon", h.daemon), ("driver", h.driver), ("scope", h.scope),
                        ("since", h.since), ("migrate", h.migrate or "-"),
                        ("processes", " ".join(map(str, pids)) or "-")])

    def _open(self, flags: int) -> OpenFile:
        return InfoFile(self._info, flags)


_DIRS = {tree.PROC: ProcNode, tree.IMAGES: ImagesNode, tree.NET: NetNode, tree.HOSTS: HostsNode}
_PID_NODES = {
    tree.CTL: CtlNode, tree.STATUS: StatusNode, tree.CHILDREN: ChildrenNode,
    tree.USERDATA: UserdataNode, tree.ENV: EnvNode, tree.WAIT: WaitNode, tree.LIMITS: LimitsNode,
    tree.STATS: StatsNode, tree.CONSOLE: ConsoleNode, tree.NOTE: NoteNode, tree.NOTEPG: NotepgNode,
    tree.PIPEDIR: PipeDirNode,
}
