"""A cluster on one machine: hosts as Linux network namespaces on one bridge,
a 3-server ZooKeeper ensemble and 3 ``cloudfs up`` daemons, one per host.

Layout (addresses of the harness's own choosing, a /24 of 10.0.0.0/8 no
route of the machine uses; no traffic leaves the machine)::

    root namespace ── bridge cfs<tag>br  10.A.B.1/24
      netns cfs-<tag>-zk1 … zk3   eth0 10.A.B.11 …  (ZooKeeper, Debian's package)
      netns cfs-<tag>-d1 … d3     eth0 10.A.B.21 …  (cloudfs up --driver fake)

Each host has one veth to the bridge: setting the root end down cuts the host
off from every other (:meth:`Cluster.partition`).  Daemons run under
``nsenter --net`` only (no mount namespace of their own), so their operator
sockets ``DIR/dN/cloudfs.sock`` are reached from the root namespace whatever
their network does: clients are never partitioned, only daemons from
ZooKeeper.  All daemons share one fake cloud (``--fake-cloud DIR/cloud``,
cloudfs.drivers.fakecloud), so a process's VM can be taken over by any
daemon, and each phase of a run is a deployment of its own
(:meth:`Cluster.start_daemons`).

:meth:`Cluster.up` writes ``DIR/cluster.json`` (names, addresses, pids), so
:func:`down` can stop and remove everything from another process
(``scripts/cluster down``).  Needs root (network namespaces, bridges).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import trio

from mountd.zkserver import ZooKeeperEnsemble, four_letter_word
from ninep.client import open_client
from ninep.errors import FsError

#: The chroot of the connect string every daemon is given.
CHROOT = "/cloudfs-cluster"
ZK_PORT = 2181


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def _free_subnet() -> str:
    """``10.A.B`` of a /24 that no address or route of the machine uses."""
    used = _ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "addr").stdout
    for _ in range(200):
        a, b = 100 + secrets.randbelow(100), secrets.randbelow(256)
        if f"10.{a}.{b}." not in used and f"10.{a}.0.0/16" not in used:
            return f"10.{a}.{b}"
    raise RuntimeError("no free 10.x.y.0/24 for the cluster")


#: Where each QEMU daemon takes moved VMs (on its host's address).
MIGRATE_PORT = 5640


@dataclass
class Host:
    """One namespace: ``name`` (zk1, d1 …), ``netns``, root-side ``veth``,
    ``address``."""

    name: str
    netns: str
    veth: str
    address: str

    @property
    def prefix(self) -> list[str]:
        """argv prefix that runs a command on this host (network only)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--"]


@dataclass
class ClusterState:
    """What ``cluster.json`` holds."""

    dir: str
    tag: str
    bridge: str
    subnet: str
    hosts: dict[str, Host]
    zk_hosts: str
    zk_pids: dict[str, int] = field(default_factory=dict)
    daemon_pids: dict[str, int] = field(default_factory=dict)


class Cluster:
    """The cluster in ``directory`` (made if missing): :meth:`up` builds the
    network and starts the ensemble; :meth:`start_daemons` starts the daemons
    on one deployment; :meth:`down` stops everything.  ``n_zk`` ZooKeeper
    servers (tick 500 ms), ``n_daemons`` daemons with ZooKeeper session
    timeout ``session_timeout`` seconds.  ``driver`` ``fake``: one fake cloud
    for all, whose creates take ``create_seconds``
    (cloudfs.drivers.fakecloud settings); ``qemu``: each daemon runs real
    VMs from its own state dir (install the images there first)."""

    def __init__(self, directory: str | os.PathLike, n_zk: int = 3, n_daemons: int = 3,
                 session_timeout: float = 4.0, create_seconds: float = 0.3, driver: str = "fake"):
        self.dir = Path(directory).resolve()
        self.n_zk, self.n_daemons = n_zk, n_daemons
        self.session_timeout = session_timeout
        self.create_seconds = create_seconds
        self.driver = driver
        self.tag = secrets.token_hex(2)
        self.state: ClusterState | None = None
        self.ensemble: ZooKeeperEnsemble | None = None
        self.daemons: dict[int, subprocess.Popen] = {}
        self.deployment = ""

    # ---- network ----------------------------------------------------------------

    def _net_up(self) -> ClusterState:
        subnet = _free_subnet()
        bridge = f"cfs{self.tag}br"
        hosts: dict[str, Host] = {}
        for i in range(1, self.n_zk + 1):
            hosts[f"zk{i}"] = Host(f"zk{i}", f"cfs-{self.tag}-zk{i}", f"cfs{self.tag}z{i}", f"{subnet}.{10 + i}")
        for i in range(1, self.n_daemons + 1):
            hosts[f"d{i}"] = Host(f"d{i}", f"cfs-{self.tag}-d{i}", f"cfs{self.tag}d{i}", f"{subnet}.{20 + i}")
        st = ClusterState(str(self.dir), self.tag, bridge, subnet, hosts, "")
        self.state = st
        self._save()  # before anything exists: down() finds what to remove
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for h in hosts.values():
            _ip("netns", "add", h.netns)
            _ip("link", "add", h.veth, "type", "veth", "peer", "name", h.veth + "p")
            _ip("link", "set", h.veth + "p", "netns", h.netns)
            _ip("-n", h.netns, "link", "set", h.veth + "p", "name", "eth0")
            _ip("-n", h.netns, "addr", "add", f"{h.address}/24", "dev", "eth0")
            _ip("-n", h.netns, "link", "set", "eth0", "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")
            _ip("link", "set", h.veth, "master", bridge)
            _ip("link", "set", h.veth, "up")
        return st

    def _save(self) -> None:
        assert self.state is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "cluster.json.tmp"
        tmp.write_text(json.dumps(asdict(self.state), indent=1))
        os.replace(tmp, self.dir / "cluster.json")

    def host(self, name: str) -> Host:
        assert self.state is not None
        return self.state.hosts[name]

    def partition(self, name: str) -> None:
        """Cut host ``name`` off from all others (its veth down)."""
        _ip("link", "set", self.host(name).veth, "down")

    def heal(self, name: str | None = None) -> None:
        """Reconnect host ``name`` (every host when None)."""
        names = [name] if name else list(self.state.hosts)
        for n in names:
            _ip("link", "set", self.host(n).veth, "up")

    # ---- ZooKeeper ---------------------------------------------------------------

    def up(self) -> None:
        """Make the network and start the ensemble (blocks until it serves)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "cloud").mkdir(exist_ok=True)
        (self.dir / "cloud" / "settings.json").write_text(json.dumps({"create_seconds": self.create_seconds}))
        st = self._net_up()
        zks = [self.host(f"zk{i}") for i in range(1, self.n_zk + 1)]
        self.ensemble = ZooKeeperEnsemble(self.n_zk, self.dir / "zk", addresses=[h.address for h in zks],
                                          prefixes=[h.prefix for h in zks])
        for i, s in self.ensemble.servers.items():
            s.port = ZK_PORT  # every host has its own address
        st.zk_hosts = ",".join(f"{h.address}:{ZK_PORT}" for h in zks) + CHROOT
        self.ensemble.start(timeout=90)
        st.zk_pids = {f"zk{i}": s.proc.pid for i, s in self.ensemble.servers.items()}
        self._save()

    def zk_leader(self) -> int:
        """The myid of the ensemble's leader (RuntimeError if none within 30 s)."""
        return self.ensemble.leader()

    def zk_kill(self, myid: int) -> None:
        """SIGKILL ZooKeeper server ``myid`` (data kept)."""
        self.ensemble.peer(myid).stop(kill=True)

    def zk_start(self, myid: int) -> None:
        """Start server ``myid`` again and wait until it serves."""
        s = self.ensemble.peer(myid)
        s.start(timeout=90)
        self.state.zk_pids[f"zk{myid}"] = s.proc.pid
        self._save()

    def zk_serving(self) -> int:
        """How many servers answer ``srvr`` with a mode (leader/follower) now."""
        return sum(1 for s in self.ensemble.servers.values()
                   if "Mode:" in four_letter_word(s.port, "srvr", 0.5, s.address))

    # ---- daemons -----------------------------------------------------------------

    def state_dir(self, i: int) -> Path:
        return self.dir / f"d{i}"

    def socket(self, i: int) -> str:
        """The dial string of daemon ``i``'s operator socket."""
        return f"unix!{self.state_dir(i) / 'cloudfs.sock'}"

    def _argv(self, i: int) -> list[str]:
        cloudfs = shutil.which("cloudfs", path=str(Path(sys.executable).parent)) or "cloudfs"
        backend = ["--driver", "fake", "--fake-cloud", str(self.dir / "cloud")] if self.driver == "fake" \
            else ["--driver", self.driver]
        argv = [*self.host(f"d{i}").prefix, cloudfs, "up", *backend,
                "--zookeeper", self.state.zk_hosts, "--state-dir", str(self.state_dir(i)),
                "--deployment", self.deployment, "--session-timeout", f"{self.session_timeout:g}", "--host", f"d{i}",
                "--max-processes", "100000", "--limit", "descendants=100000", "--limit", "env-keys=100000"]
        if self.driver == "qemu":  # VMs move between the daemons (migrate HOST)
            argv += ["--migrate-listen", f"tcp!{self.host(f'd{i}').address}!{MIGRATE_PORT}"]
        if i != 1:
            argv += ["--zookeeper-auth", str(self.state_dir(1) / "zookeeper.auth")]
        return argv

    def daemon_start(self, i: int) -> None:
        """Start daemon ``i`` (on the current deployment) without waiting."""
        d = self.state_dir(i)
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "daemon.log", "ab") as log:
            log.write(f"---- start {time.strftime('%H:%M:%S')} {self.deployment}\n".encode())
            log.flush()
            p = subprocess.Popen(self._argv(i), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        self.daemons[i] = p
        self.state.daemon_pids[f"d{i}"] = p.pid
        self._save()

    async def wait_daemon(self, i: int, timeout: float = 60.0) -> None:
        """Until daemon ``i`` answers ``ls /proc`` on its operator socket
        (RuntimeError if it exits or does not within ``timeout`` s)."""
        with trio.move_on_after(timeout):
            while True:
                p = self.daemons.get(i)
                if p is not None and p.poll() is not None:
                    raise RuntimeError(f"daemon d{i} exited with {p.returncode}; see {self.state_dir(i)}/daemon.log")
                try:
                    with trio.fail_after(5):
                        async with open_client(self.socket(i)) as c:
                            await c.listdir("proc")
                    return
                except (OSError, FsError, trio.TooSlowError, trio.BrokenResourceError):
                    await trio.sleep(0.2)
        raise RuntimeError(f"daemon d{i} did not answer within {timeout:g}s; see {self.state_dir(i)}/daemon.log")

    async def start_daemons(self, deployment: str) -> None:
        """Stop any daemons, then start every daemon on ``deployment`` (the
        first alone: it makes the credential the others are given)."""
        self.stop_daemons()
        self.deployment = deployment
        self.daemon_start(1)
        await self.wait_daemon(1)
        for i in range(2, self.n_daemons + 1):
            self.daemon_start(i)
        for i in range(2, self.n_daemons + 1):
            await self.wait_daemon(i)

    def daemon_id(self, i: int) -> str | None:
        """Daemon ``i``'s id (its owner znodes' data), from its log."""
        found = None
        try:
            for line in (self.state_dir(i) / "daemon.log").read_text(errors="replace").splitlines():
                m = re.search(r"; daemon (\S+) \(owner znodes\)", line)
                if m:
                    found = m.group(1)
        except OSError:
            pass
        return found

    def creating_owners(self, timeout: float = 5.0) -> list[str]:
        """The daemon ids that own a process of the current deployment in
        state ``creating`` now (a create in flight), one per such process;
        blocking, read with the deployment's credential."""
        from kazoo.client import KazooClient

        root = f"/cloudfs/{self.deployment}"
        auth = (self.state_dir(1) / "zookeeper.auth").read_text().strip()
        k = KazooClient(self.state.zk_hosts, auth_data=[("digest", auth)], timeout=10)
        k.start(timeout)
        try:
            out = []
            for name in k.get_children(f"{root}/owners"):
                try:
                    owner = k.get(f"{root}/owners/{name}")[0].decode()
                    rec = json.loads(k.get(f"{root}/proc/{name}")[0])
                except Exception:  # ended meanwhile
                    continue
                if rec.get("state") == "creating":
                    out.append(owner)
            return out
        finally:
            k.stop()
            k.close()

    def daemon_signal(self, i: int, sig: int) -> None:
        """Send ``sig`` (SIGSTOP, SIGCONT, SIGKILL …) to daemon ``i``."""
        p = self.daemons[i]
        if p.poll() is None:
            os.kill(p.pid, sig)

    def daemon_kill(self, i: int) -> None:
        """SIGKILL daemon ``i`` and reap it."""
        p = self.daemons.get(i)
        if p is not None and p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            os.kill(p.pid, signal.SIGKILL)
            p.wait(30)

    def stop_daemons(self) -> None:
        """SIGTERM every daemon (SIGKILL after 15 s)."""
        for p in self.daemons.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.terminate()
        for p in self.daemons.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(15)
        self.daemons.clear()

    def down(self) -> None:
        """Stop everything and remove the network (idempotent)."""
        self.stop_daemons()
        if self.ensemble is not None:
            for s in self.ensemble.servers.values():
                s.stop(kill=True)
        down(self.dir)


def down(directory: str | os.PathLike) -> None:
    """Stop what ``directory/cluster.json`` names (from any process) and
    remove its namespaces, veths and bridge; the directory stays (logs)."""
    path = Path(directory) / "cluster.json"
    try:
        st = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    for pid in [*st.get("daemon_pids", {}).values(), *st.get("zk_pids", {}).values()]:
        try:  # only what is still ours (the pid may have been reused)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if st.get("dir") and str(st["dir"]).encode() in cmdline:  # its state dir or zoo.cfg is in there
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for h in st.get("hosts", {}).values():
        _ip("link", "del", h["veth"], check=False)
        _ip("netns", "del", h["netns"], check=False)
    _ip("link", "del", st.get("bridge", ""), check=False)
