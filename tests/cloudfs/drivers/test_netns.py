"""cloudfs.drivers.netns on real namespaces: a listener made in a process's
network namespace is reachable from inside it only (also in the rootless
form, a user namespace that maps the caller to root), and never made in the
caller's own namespace."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from cloudfs.drivers.netns import NetnsError, listen_in, netns_argv
from mountd.zkserver import free_port

#: Run inside the namespace: connect to 127.0.0.1:argv[1], send a line, print the answer.
CLIENT = "import socket, sys; s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), 5); " \
         "s.sendall(b'ping\\n'); print(s.recv(100).decode().strip())"


@pytest.fixture(params=[False, True], ids=["root", "rootless"])
def sleeper(request):
    """(pid of a process in a new network namespace, rootless)."""
    rootless = request.param
    p = subprocess.Popen(netns_argv(rootless) + ["sleep", "60"])
    try:
        for _ in range(100):  # until sh has exec'd sleep in the new namespace
            try:
                if open(f"/proc/{p.pid}/cmdline", "rb").read().startswith(b"sleep"):
                    break
            except OSError:
                pass
            subprocess.run(["sleep", "0.02"])
        yield p.pid, rootless
    finally:
        p.kill()
        p.wait()


def _ns(pid: int, kind: str) -> int:
    return os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)


def test_listener_is_reachable_from_inside_only(sleeper):
    pid, rootless = sleeper
    assert os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
    port = free_port()
    net, user = _ns(pid, "net"), _ns(pid, "user") if rootless else None
    try:
        lsock = listen_in(net, port, userns_fd=user)
        try:
            assert lsock.getsockname() == ("127.0.0.1", port) and not lsock.get_inheritable()
            with pytest.raises(ConnectionRefusedError):  # not in our namespace
                socket.create_connection(("127.0.0.1", port), 2).close()
            enter = ["nsenter", f"--target={pid}", "--net"] + (["--user", "--preserve-credentials"] if rootless
                                                               else [])
            client = subprocess.Popen(enter + [sys.executable, "-c", CLIENT, str(port)], stdout=subprocess.PIPE)
            lsock.settimeout(10)
            conn, peer = lsock.accept()
            with conn:
                assert peer[0] == "127.0.0.1" and conn.recv(100) == b"ping\n"
                conn.sendall(b"pong\n")
            assert client.communicate(timeout=10)[0] == b"pong\n"
            with pytest.raises(NetnsError, match="in use"):  # the port is taken there now
                listen_in(net, port, userns_fd=user)
        finally:
            lsock.close()
    finally:
        os.close(net)
        if user is not None:
            os.close(user)


def test_never_in_our_own_namespace():
    own = _ns(os.getpid(), "net")
    try:
        with pytest.raises(NetnsError, match="own network namespace"):
            listen_in(own, free_port())
    finally:
        os.close(own)
