"""A throwaway ZooKeeper for tests: Debian's ``zookeeper`` package, run as a
child process on a free loopback port with its data in a temporary directory.

- :class:`ZooKeeperServer` starts/stops one server; ``stop()`` then ``start()``
  again on the same port and data directory is a restart (for session-loss tests).
- ``zookeeper`` (session scope) is one server shared by the whole test session;
- ``zk_root`` (function scope) is a fresh, unique znode path per test, so tests
  never see each other's records (the "chroot" each CloudFS gets as its root).

Every process started here is stopped in a ``finally``, even when a test fails.
Import the fixtures into a ``conftest.py``: ``from tests.zookeeper import zookeeper, zk_root``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid

import pytest

_JAVA_DIR = "/usr/share/java"
# The jars QuorumPeerMain needs (Debian names, unversioned symlinks).
_JARS = [
    "zookeeper.jar", "zookeeper-jute.jar", "netty-handler.jar", "netty-transport.jar",
    "netty-common.jar", "netty-buffer.jar", "netty-codec.jar", "netty-resolver.jar",
    "netty-transport-native-epoll.jar", "netty-transport-native-unix-common.jar",
    "slf4j-api.jar", "slf4j-nop.jar", "commons-cli.jar", "metrics-core.jar", "snappy-java.jar",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    """True when the server serves clients: its ``srvr`` answer names its mode
    (before that it says "not currently serving requests", and a client's
    first connection would hang until its session timeout)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"srvr")
            s.settimeout(1.0)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            return b"Mode:" in data
    except OSError:
        return False


class ZooKeeperServer:
    """One standalone ZooKeeper 3.8 server on ``127.0.0.1:port``.

    ``hosts`` is the kazoo connection string.  ``start()`` blocks until the
    server answers (RuntimeError after ``timeout`` seconds); ``stop()`` kills
    it (SIGKILL: like a crashed server, the data directory survives).
    """

    def __init__(self, port: int | None = None, data_dir: str | None = None):
        self.port = port or free_port()
        self._own_dir = data_dir is None
        self.dir = data_dir or tempfile.mkdtemp(prefix="cloudfs-zk-")
        self.proc: subprocess.Popen | None = None

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        os.makedirs(os.path.join(self.dir, "data"), exist_ok=True)
        cfg = os.path.join(self.dir, "zoo.cfg")
        with open(cfg, "w") as f:
            f.write(
                "tickTime=500\n"
                "minSessionTimeout=1000\n"
                "maxSessionTimeout=60000\n"
                f"dataDir={self.dir}/data\n"
                f"clientPort={self.port}\n"
                "clientPortAddress=127.0.0.1\n"
                "admin.enableServer=false\n"
                "maxClientCnxns=0\n"
                "4lw.commands.whitelist=srvr,ruok\n"
                "forceSync=no\n"
            )
        cp = ":".join(os.path.join(_JAVA_DIR, j) for j in _JARS) + ":/etc/zookeeper/conf"
        log = open(os.path.join(self.dir, "zookeeper.log"), "ab")
        try:
            self.proc = subprocess.Popen(
                ["java", "-Xmx512m", "-Dzookeeper.jmx.log4j.disable=true", "-cp", cp,
                 "org.apache.zookeeper.server.quorum.QuorumPeerMain", cfg],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ZooKeeper exited with {self.proc.returncode}; see {self.dir}/zookeeper.log")
            if _answers(self.port):
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"ZooKeeper did not answer on {self.hosts} within {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def cleanup(self) -> None:
        """Stop and remove the data directory (if this object made it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def zookeeper():
    """The session's ZooKeeperServer (started once, killed at session end)."""
    server = ZooKeeperServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def zk_root(zookeeper) -> str:
    """A fresh znode path no other test uses, e.g. ``/test-3f2a…``."""
    return f"/test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def private_zookeeper():
    """A ZooKeeperServer of this test alone, to stop and restart at will."""
    server = ZooKeeperServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()
