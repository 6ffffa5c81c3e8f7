"""The 9P face of one VM's channel: the connection is the credential.

A QEMU guest reaches the daemon only through its channel (a TCP listener in
the VM's own network namespace, cloudfs.drivers.netns).  Whatever arrives on
it comes from that VM, so :class:`ChannelFS` attaches every connection as
that process with its rights (cloudfs.nodes.View), without a secret: aname
``proc/<pid>`` (the guest's ``/sbin/cloudfs-mount``) or ``""``.  Any other
aname is EACCES, so a guest cannot attach as another process or as the
operator, and there is no bearer credential to steal or replay from
elsewhere.  Guests of drivers without channels (OpenStack: tenant network,
TCP) keep the pid/secret credential of cloudfs.identity.

Bounds per VM (:data:`CHANNEL_LIMITS`): 4 concurrent 9P connections (a
fifth is accepted and closed at once, logged, and the first four go on),
each with the per-connection bounds of ninep.limits (256 fids, 64
outstanding requests, replies of 8 msizes queued), so a VM's channel holds
at most ``4 × CHANNEL_LIMITS.worst_case_bytes(CHANNEL_MSIZE)`` bytes
(≈ 37 MiB; ≈ 19 MiB at the guest's msize of 64 KiB) and 5 descriptors
(listener + connections) of the daemon, plus what the kernel queues in the
listen backlog (8).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import trio

from ninep.errors import FsError
from ninep.fs import FileSystem, Node
from ninep.limits import Limits
from ninep.server import Server

if TYPE_CHECKING:
    from .namespace import CloudFS

__all__ = ["ChannelFS", "Channels", "CHANNEL_LIMITS", "CHANNEL_MSIZE"]

#: 9P bounds of one VM's channel (see the module doc).
CHANNEL_LIMITS = Limits(max_connections=4, max_connections_per_peer=4, max_fids=256, max_outstanding=64,
                        max_queued_msizes=8)
#: The largest msize a channel offers (the guest mounts with 64 KiB + 24).
CHANNEL_MSIZE = 128 * 1024 + 24


class ChannelFS(FileSystem):
    """The tree served on the channel of process ``pid``: that process's
    view for aname ``proc/<pid>`` or ``""`` (ENOENT once the process is
    gone), EACCES for any other aname (9P2000.L Tattach; the uname is the
    guest user's and changes nothing)."""

    def __init__(self, fs: "CloudFS", pid: int):
        self.fs = fs
        self.pid = pid

    async def attach(self, uname: str, aname: str, n_uname: int | None = None) -> Node:
        name = aname.strip("/")
        if name not in ("", f"proc/{self.pid}"):
            raise FsError(errno.EACCES, f"this channel attaches as process {self.pid} only (aname proc/{self.pid})")
        if await self.fs.records.cached(self.pid) is None:
            raise FsError(errno.ENOENT, f"process {self.pid} is gone")
        return self.fs.view_for(self.pid)


class Channels:
    """Serves VM channels for one CloudFS: :meth:`serve` is the QEMU driver's
    ``channel_handler``.  ``trace`` as for ninep.server.Server."""

    def __init__(self, fs: "CloudFS", *, limits: Limits = CHANNEL_LIMITS, msize: int = CHANNEL_MSIZE,
                 trace: bool = False):
        self.fs = fs
        self.limits = limits
        self.msize = msize
        self.trace = trace
        #: pid → the Server of its channel (for tests and tools)
        self.servers: dict[int, Server] = {}

    async def serve(self, pid: int, listener: trio.SocketListener) -> None:
        """Serve process ``pid``'s view on ``listener`` until cancelled."""
        server = Server(ChannelFS(self.fs, pid), msize=self.msize, trace=self.trace, limits=self.limits)
        self.servers[pid] = server
        try:
            await server.serve_listeners([listener])
        finally:
            if self.servers.get(pid) is server:
                del self.servers[pid]
