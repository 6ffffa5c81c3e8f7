"""A VM's 9P channel: QEMU in a network namespace of its own, the daemon
listening inside it.

Each QEMU of the QEMU driver starts in a new Linux network namespace
(``unshare --net``, with ``--user --map-root-user`` when the daemon is not
root) whose only interface is ``lo``.  QEMU's user-mode network stack
(libslirp) makes the guest's connections to the host alias 10.0.2.2 as
connections from QEMU to 127.0.0.1 *in that namespace*, so the guest can reach
exactly one thing: a TCP listener the daemon puts there with
:func:`listen_in` (a short-lived helper enters the namespace, open as a
descriptor the caller pinned, with ``nsenter``, binds 127.0.0.1:``port``,
and hands the listening socket back over a unix socket pair, SCM_RIGHTS,
unix(7); the socket's own namespace is checked with SIOCGSKNS).  Every guest connection is one
TCP connection accepted by the daemon itself: no host process per
connection, closes travel both ways, and the listener a connection came in
on says which VM it is (see cloudfs.channel).  Nothing else is reachable:
no route leaves the namespace, and other local users cannot connect to a
listener in it.

Why this channel (the alternatives, measured here with QEMU 7.2 and the
guest's 6.1 kernel): ``guestfwd=…-cmd:`` runs a host process per guest
connection (~12 MB each, unbounded); ``guestfwd=…-chardev:`` to a unix
socket carries every guest connection as one byte stream and passes no
close either way, so a remount after a daemon restart hangs;
``trans=fd`` over a virtio-serial port fails in the guest ("kernel write
not supported": virtio_console has no write_iter); the host has no
vhost-vsock.  A namespace per VM keeps real TCP semantics for every
connection at the cost of one listener (and no process) per VM.

The namespace lives as long as the QEMU in it (and the daemon's listener);
a restarted daemon opens a new listener in the running QEMU's namespace, so
guests keep running and remount.  Measured here (QEMU 7.2, libslirp 4.7):
the guest's ``nc 10.0.2.2 564`` reaches the listener; any other port is
ECONNREFUSED, any other address ENETUNREACH.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys

__all__ = ["netns_argv", "listen_in", "NetnsError"]


class NetnsError(OSError):
    """The namespace could not be entered or the listener not made there."""


def _tool(name: str) -> str:
    """The absolute path of ``name`` (also in sbin dirs, off a user's PATH)."""
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin",
                                                     "/usr/bin", "/bin"]))
    if found is None:
        raise NetnsError(f"{name} not found (util-linux / iproute2)")
    return found


def netns_argv(rootless: bool | None = None) -> list[str]:
    """The prefix that runs a command in a new network namespace with ``lo``
    up: ``unshare --net`` (``--user --map-root-user`` too when ``rootless``,
    default: when not running as root, since only root may make a bare
    network namespace), then ``sh -c 'ip link set lo up && exec "$@"'``.
    NetnsError when unshare or ip is missing."""
    if rootless is None:
        rootless = os.geteuid() != 0
    argv = [_tool("unshare")]
    if rootless:
        argv += ["--user", "--map-root-user"]
    return argv + ["--net", "--", "/bin/sh", "-c", f'{_tool("ip")} link set lo up && exec "$@"', "cloudfs-netns"]


#: Run in the namespace (by nsenter): bind 127.0.0.1:argv[2], listen with
#: backlog argv[3], send the socket over the unix socket whose fd is argv[1].
_HELPER = r"""
import socket, sys
c = socket.socket(fileno=int(sys.argv[1]))
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[2])))
s.listen(int(sys.argv[3]))
socket.send_fds(c, [b"L"], [s.fileno()])
"""

#: ioctl(2) on a socket: a descriptor of its network namespace (sock_ioctl, Linux ≥ 4.9).
SIOCGSKNS = 0x894C


def _ns_inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def listen_in(netns_fd: int, port: int, *, userns_fd: int | None = None, backlog: int = 8,
              timeout: float = 10.0) -> socket.socket:
    """Blocking: a TCP socket listening on 127.0.0.1:``port`` in the network
    namespace open as ``netns_fd`` (``/proc/<pid>/ns/net`` of a process
    started under :func:`netns_argv`, opened by the caller after checking
    that pid, so the namespace cannot change under it), close-on-exec,
    blocking.  ``userns_fd``: the namespace's user namespace, which a
    non-root caller must enter too.  Takes one short helper process
    (nsenter + Python, ~50 ms).  Raises NetnsError when ``netns_fd`` is this
    process's own namespace (that would listen on the host), when the
    namespace cannot be entered, the port is taken there, or what comes
    back is not that listener."""
    try:
        if _ns_inode(netns_fd) == os.stat("/proc/self/ns/net").st_ino:
            raise NetnsError("refusing to listen in this process's own network namespace")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as e:
        if isinstance(e, NetnsError):
            raise
        raise NetnsError(f"cannot make a channel listener: {e}") from e
    try:
        fds = [theirs.fileno(), netns_fd] + ([userns_fd] if userns_fd is not None else [])
        argv = [_tool("nsenter"), f"--net=/proc/self/fd/{netns_fd}"]
        if userns_fd is not None:  # keep our ids: setgroups is denied in a --map-root-user namespace
            argv += [f"--user=/proc/self/fd/{userns_fd}", "--preserve-credentials"]
        argv += ["--", sys.executable, "-I", "-c", _HELPER, str(theirs.fileno()), str(int(port)), str(int(backlog))]
        try:
            p = subprocess.run(argv, pass_fds=fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NetnsError(f"cannot enter the VM's network namespace: {e}") from e
        theirs.close()
        if p.returncode != 0:
            err = p.stderr.decode(errors="replace").strip().splitlines()
            raise NetnsError(f"cannot listen in the VM's network namespace: "
                             f"{err[-1] if err else f'status {p.returncode}'}")
        ours.settimeout(timeout)
        try:
            msg, got, _flags, _addr = socket.recv_fds(ours, 16, 1, socket.MSG_CMSG_CLOEXEC)
        except OSError as e:
            raise NetnsError(f"no listener from the VM's network namespace: {e}") from e
        if msg != b"L" or len(got) != 1:
            for fd in got:
                os.close(fd)
            raise NetnsError("no listener from the VM's network namespace")
        try:
            os.set_inheritable(got[0], False)
            s = socket.socket(fileno=got[0])
        except OSError as e:
            os.close(got[0])
            raise NetnsError(f"the helper sent no socket: {e}") from e
        try:
            _check_listener(s, port, _ns_inode(netns_fd))
        except BaseException:
            s.close()
            raise
        return s
    finally:
        ours.close()
        theirs.close()


def _check_listener(s: socket.socket, port: int, ns_inode: int) -> None:
    """NetnsError unless ``s`` listens on 127.0.0.1:``port`` over TCP in the
    namespace of inode ``ns_inode`` (SIOCGSKNS)."""
    try:
        ok = (s.family == socket.AF_INET and s.type == socket.SOCK_STREAM
              and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
              and s.getsockname() == ("127.0.0.1", port))
        nsfd = fcntl.ioctl(s.fileno(), SIOCGSKNS)
        try:
            ok = ok and _ns_inode(nsfd) == ns_inode
        finally:
            os.close(nsfd)
    except OSError as e:
        raise NetnsError(f"cannot check the channel listener: {e}") from e
    if not ok:
        raise NetnsError("the helper's socket is not the VM's 127.0.0.1 listener")
