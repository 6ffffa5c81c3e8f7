"""An embedded ZooKeeper: Debian's ``zookeeper`` package run as a child process.

``cloudfs up`` without ``--zookeeper`` starts one with its data under the state
directory and stops it on exit; tests start throwaway ones on free ports.  The
server listens on 127.0.0.1 only.  A daemon's embedded server
(``die_with_parent=True``) gets PR_SET_PDEATHSIG, so it dies with the daemon,
even on ``kill -9`` (the data directory survives, and the next start finds
every record).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

JAVA_DIR = "/usr/share/java"
#: The jars QuorumPeerMain needs (Debian's unversioned names).
JARS = [
    "zookeeper.jar", "zookeeper-jute.jar", "netty-handler.jar", "netty-transport.jar",
    "netty-common.jar", "netty-buffer.jar", "netty-codec.jar", "netty-resolver.jar",
    "netty-transport-native-epoll.jar", "netty-transport-native-unix-common.jar",
    "slf4j-api.jar", "slf4j-nop.jar", "commons-cli.jar", "metrics-core.jar", "snappy-java.jar",
]
_PR_SET_PDEATHSIG = 1
#: zoo.cfg autopurge: snapshots (with their transaction logs) kept, and hours
#: between purges (ZooKeeper's autopurge.snapRetainCount / purgeInterval).
AUTOPURGE_RETAIN = 3
AUTOPURGE_HOURS = 1
#: Transactions between snapshots (a log rolls with each): ZooKeeper's
#: default is 100,000; fewer keeps each purged generation small.
SNAP_COUNT = 10_000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port: int, address: str = "127.0.0.1") -> bool:
    """True when a ZooKeeper on ``address``:``port`` serves clients (answers
    ``srvr`` with its statistics: a peer without a quorum answers "This
    ZooKeeper instance is not currently serving requests")."""
    return "Mode:" in four_letter_word(port, "srvr", 0.5, address)


def four_letter_word(port: int, word: str, timeout: float = 2.0, address: str = "127.0.0.1") -> str:
    """ZooKeeper's answer to a four-letter word (``srvr``, ``wchs``, ``mntr``:
    the ones zoo.cfg allows) on ``address``:``port``; "" if it does not answer."""
    chunks = []
    try:
        with socket.create_connection((address, port), timeout=timeout) as s:
            s.sendall(word.encode())
            s.settimeout(timeout)
            while chunk := s.recv(65536):
                chunks.append(chunk)
    except OSError:
        pass
    return b"".join(chunks).decode(errors="replace")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.umask(0o077)  # its snapshots and logs hold every secret: the daemon's user only
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setsid()


def _own_session() -> None:  # runs in the child between fork and exec
    os.umask(0o077)
    os.setsid()


class ZooKeeperServer:
    """One standalone ZooKeeper 3.8 server on ``127.0.0.1:port``.

    ``data_dir`` holds zoo.cfg, the snapshots/logs and zookeeper.log (a
    temporary directory when None, removed by :meth:`cleanup`).  ``hosts`` is
    the kazoo connection string.  :meth:`start` blocks until the server answers
    (RuntimeError after ``timeout`` seconds); :meth:`stop` stops it (SIGTERM,
    or SIGKILL with ``kill=True``, like a crash: the data survives).
    ``tick_ms`` is ZooKeeper's tickTime; sessions may last 2 to 120 ticks.
    ``die_with_parent``: the server gets SIGKILL when the thread that
    launched it ends (for a daemon's embedded server; launch from the main
    thread).  ``prefix``: argv the java command runs under (e.g. ``nsenter
    --net=/run/netns/zk1`` to run it on a host of the cluster harness).
    """

    def __init__(self, port: int | None = None, data_dir: str | os.PathLike | None = None, *,
                 tick_ms: int = 500, die_with_parent: bool = False, address: str = "127.0.0.1",
                 myid: int | None = None, peers: dict[int, str] | None = None, prefix: Sequence[str] = ()):
        self.port = port or free_port()
        self.prefix = list(prefix)
        self.address = address
        self.myid = myid
        self.peers = peers or {}
        self._own_dir = data_dir is None
        self.dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="cloudfs-zk-"))
        self.tick_ms = tick_ms
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen | None = None

    @property
    def hosts(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.dir / "zookeeper.log"

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it answers."""
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the server process without waiting.  With ``die_with_parent``
        call it from the thread that lives as long as the server should (the
        main thread): the server gets SIGKILL when that thread ends."""
        if shutil.which("java") is None:
            raise RuntimeError("java not found: install Debian's zookeeper package (scripts/install-deps)")
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        for d in (self.dir, self.dir / "data"):
            os.chmod(d, 0o700)
        cfg = self.dir / "zoo.cfg"
        cfg.write_text(
            f"tickTime={self.tick_ms}\n"
            f"minSessionTimeout={2 * self.tick_ms}\n"
            f"maxSessionTimeout={120 * self.tick_ms}\n"
            f"dataDir={self.dir}/data\n"
            f"clientPort={self.port}\n"
            f"clientPortAddress={self.address}\n"
            "admin.enableServer=false\n"
            "maxClientCnxns=0\n"
            "4lw.commands.whitelist=srvr,ruok,wchs,mntr\n"
            "forceSync=no\n"
            # keep the newest AUTOPURGE_RETAIN snapshots and their logs, purge
            # the rest every AUTOPURGE_HOURS: the data dir does not grow forever
            f"autopurge.snapRetainCount={AUTOPURGE_RETAIN}\n"
            f"autopurge.purgeInterval={AUTOPURGE_HOURS}\n"
            f"snapCount={SNAP_COUNT}\n"
            + ("initLimit=10\nsyncLimit=5\n" + "".join(f"server.{i}={spec}\n" for i, spec in sorted(self.peers.items()))
               if self.peers else "")
        )
        if self.myid is not None:
            (self.dir / "data" / "myid").write_text(f"{self.myid}\n")
        cp = ":".join(os.path.join(JAVA_DIR, j) for j in JARS) + ":/etc/zookeeper/conf"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, shutil.which("java") or "java", "-Xmx512m", "-Dzookeeper.jmx.log4j.disable=true", "-cp", cp,
                 "org.apache.zookeeper.server.quorum.QuorumPeerMain", str(cfg)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if self.die_with_parent else _own_session,
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the launched server answers; RuntimeError if it exits or
        does not answer within ``timeout`` seconds (it is then killed)."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ZooKeeper exited with {self.proc.returncode}; see {self.log_path}")
            if answers(self.port, self.address):
                return
            time.sleep(0.1)
        self.stop(kill=True)
        raise RuntimeError(f"ZooKeeper did not answer on {self.hosts} within {timeout}s; see {self.log_path}")

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (idempotent)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def cleanup(self) -> None:
        """Stop and remove the data directory (if this object made it)."""
        self.stop(kill=True)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def embedded(state_dir: Path) -> ZooKeeperServer:
    """The ZooKeeperServer of a daemon's state directory: data in
    ``state_dir/zookeeper``; the port is chosen once and kept in its ``port``
    file, so a restarted daemon (and other daemons told ``--zookeeper``) find
    it at the same address."""
    d = state_dir / "zookeeper"
    d.mkdir(parents=True, exist_ok=True)
    port_file = d / "port"
    port = None
    if port_file.exists():
        try:
            port = int(port_file.read_text().strip())
        except ValueError:
            port = None
    if port is None or answers(port):
        # no port yet, or something else (a stale server of a crashed daemon
        # that somehow survived) already answers there: take a fresh port
        port = free_port()
        port_file.write_text(f"{port}\n")
    return ZooKeeperServer(port, d, die_with_parent=True)


class ZooKeeperEnsemble:
    """An ensemble of ``n`` ZooKeeper servers (a quorum is n // 2 + 1), one
    ZooKeeperServer per peer, each with its data in ``dir/zk<id>``.

    ``addresses``: the address of each peer (default 127.0.0.1 for all,
    distinct ports); clients and peers use them, so peers in network
    namespaces of their own are reached at their hosts' addresses.
    ``prefixes``: each peer's ZooKeeperServer ``prefix`` (say, the network
    namespace of its host).  :attr:`hosts` is the kazoo connect string of
    all of them.  Peers start and stop one by one (:meth:`peer`), e.g. to
    kill the leader (:meth:`leader`)."""

    def __init__(self, n: int = 3, base_dir: str | os.PathLike | None = None, *, tick_ms: int = 500,
                 addresses: list[str] | None = None, die_with_parent: bool = False,
                 prefixes: Sequence[Sequence[str]] | None = None):
        self._own_dir = base_dir is None
        self.dir = Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="cloudfs-zke-"))
        addrs = addresses or ["127.0.0.1"] * n
        ports = {i: (free_port(), free_port(), free_port()) for i in range(1, n + 1)}
        peers = {i: f"{addrs[i - 1]}:{q}:{e}" for i, (_, q, e) in ports.items()}
        self.servers = {i: ZooKeeperServer(ports[i][0], self.dir / f"zk{i}", tick_ms=tick_ms,
                                           die_with_parent=die_with_parent, address=addrs[i - 1], myid=i,
                                           peers=peers, prefix=prefixes[i - 1] if prefixes else ())
                        for i in ports}

    @property
    def hosts(self) -> str:
        return ",".join(s.hosts for s in self.servers.values())

    def peer(self, myid: int) -> ZooKeeperServer:
        return self.servers[myid]

    def start(self, timeout: float = 60.0) -> None:
        """Start every peer and wait until each serves (a quorum formed)."""
        for s in self.servers.values():
            s.launch()
        for s in self.servers.values():
            s.wait_ready(timeout)

    def mode(self, myid: int) -> str:
        """``leader``, ``follower`` or "" (down, or not serving) of a peer."""
        s = self.servers[myid]
        for line in four_letter_word(s.port, "srvr", 1.0, s.address).splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return ""

    def leader(self, timeout: float = 30.0) -> int:
        """The id of the current leader (RuntimeError if none within ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i in self.servers:
                if self.mode(i) == "leader":
                    return i
            time.sleep(0.1)
        raise RuntimeError("no ZooKeeper leader")

    def cleanup(self) -> None:
        for s in self.servers.values():
            s.cleanup()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
