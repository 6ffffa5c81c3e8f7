"""Plan 9 dial strings: ``net!host!service`` (dial(2)) for listening and dialling.

Accepted forms:

- ``tcp!HOST!PORT``: TCP; HOST is a name or address (``*`` = all addresses),
  PORT a number or the service name ``9fs``/``9p`` (564).  ``tcp!HOST`` means
  port 564.  ``net!HOST!PORT`` is read as tcp.
- ``unix!/PATH``: a Unix-domain stream socket.

TCP streams get TCP_NODELAY: 9P is request/response and Nagle's algorithm would
add up to 40 ms to every small reply.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass

import trio

NINEP_PORT = 564
_SERVICES = {"9fs": NINEP_PORT, "9p": NINEP_PORT, "9pfs": NINEP_PORT}


@dataclass(frozen=True, slots=True)
class DialString:
    """A parsed dial string: ``net`` is "tcp" or "unix"; ``host``/``port`` for
    tcp (port 0 = any free port when listening), ``path`` for unix."""

    net: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.net == "unix":
            return f"unix!{self.path}"
        return f"tcp!{self.host}!{self.port}"


def parse_dial(s: str) -> DialString:
    """Parse a dial string.  Raises ValueError with a message saying what is wrong."""
    parts = s.split("!")
    net = parts[0]
    if net == "unix":
        if len(parts) != 2 or not parts[1]:
            raise ValueError(f"dial string {s!r}: want unix!/path")
        return DialString("unix", path=parts[1])
    if net in ("tcp", "net"):
        if len(parts) not in (2, 3) or not parts[1]:
            raise ValueError(f"dial string {s!r}: want tcp!host!port")
        host = parts[1]
        service = parts[2] if len(parts) == 3 else "9fs"
        if service in _SERVICES:
            port = _SERVICES[service]
        else:
            try:
                port = int(service, 10)
            except ValueError:
                raise ValueError(f"dial string {s!r}: unknown service {service!r}") from None
            if not 0 <= port <= 65535:
                raise ValueError(f"dial string {s!r}: port {port} out of range")
        return DialString("tcp", host=host, port=port)
    raise ValueError(f"dial string {s!r}: unknown network {net!r} (want tcp or unix)")


def _nodelay(stream: trio.SocketStream) -> None:
    if stream.socket.family in (socket.AF_INET, socket.AF_INET6):
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)


class _NodelayListener(trio.abc.Listener[trio.SocketStream]):
    """Wraps a SocketListener so every accepted stream has TCP_NODELAY set."""

    def __init__(self, inner: trio.SocketListener):
        self.inner = inner
        self.socket = inner.socket

    async def accept(self) -> trio.SocketStream:
        stream = await self.inner.accept()
        _nodelay(stream)
        return stream

    async def aclose(self) -> None:
        await self.inner.aclose()


async def open_listeners(dialstring: str, *, unix_mode: int = 0o600) -> list[trio.abc.Listener]:
    """Listeners for ``dialstring``.  A unix socket file is created with mode
    ``unix_mode`` (a stale socket file is replaced; any other file is an error).

    Raises ValueError for a bad dial string, OSError when binding fails.
    """
    d = parse_dial(dialstring)
    if d.net == "tcp":
        host = None if d.host == "*" else d.host
        listeners = await trio.open_tcp_listeners(d.port, host=host)
        return [_NodelayListener(l) for l in listeners]
    try:
        st = os.lstat(d.path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{d.path} exists and is not a socket")
        os.unlink(d.path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~unix_mode)
    try:
        await sock.bind(d.path)
    finally:
        os.umask(old)
    os.chmod(d.path, unix_mode)
    sock.listen(128)
    return [trio.SocketListener(sock)]


def listener_address(listener: trio.abc.Listener) -> str:
    """The dial string a listener is bound to, e.g. ``tcp!127.0.0.1!45123``."""
    sock = listener.socket  # type: ignore[attr-defined]
    if sock.family == socket.AF_UNIX:
        return f"unix!{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"tcp!{host}!{port}"


async def dial(dialstring: str) -> trio.abc.Stream:
    """Connect to ``dialstring``; returns a trio Stream (TCP_NODELAY set).

    Raises ValueError for a bad dial string, OSError when the connection fails.
    """
    d = parse_dial(dialstring)
    if d.net == "unix":
        return await trio.open_unix_socket(d.path)
    stream = await trio.open_tcp_stream(d.host, d.port)
    _nodelay(stream)
    return stream
