"""A VM's 9P channel: QEMU in a network namespace of its own, the daemon
listening inside it.

Each QEMU of the QEMU driver starts in a new Linux network namespace
(``unshare --net``, with ``--user --map-root-user`` when the daemon is not
root) whose only interface is ``lo``.  QEMU's user-mode network stack
(libslirp) makes the guest's connections to the host alias 10.0.2.2 as
connections from QEMU to 127.0.0.1 *in that namespace*, so the guest can reach
exactly one thing: a TCP listener the daemon puts there with
:func:`listen_in` (a short-lived helper enters the namespace with
``nsenter``, binds 127.0.0.1:``port``, and hands the listening socket back
over a unix socket pair, SCM_RIGHTS, unix(7)).  Every guest connection is one
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


def listen_in(target_pid: int, port: int, *, backlog: int = 8, rootless: bool | None = None,
              timeout: float = 10.0) -> socket.socket:
    """Blocking: a TCP socket listening on 127.0.0.1:``port`` in the network
    namespace of process ``target_pid`` (a QEMU started under
    :func:`netns_argv`; ``rootless`` as there), close-on-exec, blocking.
    Takes one short helper process (nsenter + Python, ~50 ms).  Raises
    NetnsError when the namespace cannot be entered (the process is gone,
    no permission) or the port is taken there."""
    if rootless is None:
        rootless = os.geteuid() != 0
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        argv = [_tool("nsenter"), f"--target={int(target_pid)}", "--net"]
        if rootless:  # keep our ids: setgroups is denied in a --map-root-user namespace
            argv += ["--user", "--preserve-credentials"]
        argv += ["--", sys.executable, "-I", "-c", _HELPER, str(theirs.fileno()), str(int(port)), str(int(backlog))]
        try:
            p = subprocess.run(argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NetnsError(f"cannot enter the network namespace of {target_pid}: {e}") from e
        theirs.close()
        if p.returncode != 0:
            err = p.stderr.decode(errors="replace").strip().splitlines()
            raise NetnsError(f"cannot listen in the network namespace of {target_pid}: "
                             f"{err[-1] if err else f'status {p.returncode}'}")
        ours.settimeout(timeout)
        try:
            msg, fds, _flags, _addr = socket.recv_fds(ours, 16, 1)
        except OSError as e:
            raise NetnsError(f"no listener from the network namespace of {target_pid}: {e}") from e
        if msg != b"L" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise NetnsError(f"no listener from the network namespace of {target_pid}")
        os.set_inheritable(fds[0], False)
        return socket.socket(fileno=fds[0])
    finally:
        ours.close()
        theirs.close()

