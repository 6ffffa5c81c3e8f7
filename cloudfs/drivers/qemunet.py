"""Layer-2 networks among the QEMU driver's VMs on one host: a hub QEMU per
network.

A network ``lab`` is a directory ``STATE/nets/n-<6 hex digits>/`` and one QEMU started
with ``-machine none`` (no guest: only its net layer) whose hub (QEMU's
``hubport`` netdevs, hubid 0) floods every frame to every port.  Each VM on
the network gets a port: its QEMU's second (third …) NIC listens on
``STATE/nets/n-…/<vm id's hex>.sock`` (short: unix socket paths are) (``-netdev stream,server=on``, a unix
socket, one peer), and once it runs the driver adds, over the hub's QMP
socket, a ``stream`` netdev connecting there, joined to the hub.  Measured here (QEMU
7.2, TCG): two guests on one hub ping each other in ~3 ms; ports are added
and removed with QMP ``netdev_add``/``netdev_del`` while the hub runs.

Isolation: a hub carries only its own ports' frames, so VMs on different
networks cannot reach each other at layer 2 (and no host routes between
them); the sockets are in the network's directory in the state dir (0700),
so other local users cannot attach.  A unix socket
works across network namespaces, so VMs keep their private namespace (the
channel).  A hub has no port security: every VM on a network sees and can
spoof the others' frames, so a network is one trust domain.  The hub runs
daemonized, like the VMs: a daemon restart leaves networks and their
traffic alone.  A hub that is gone (the host rebooted, it crashed) shows as
``down`` and is started again, and joined to the running VMs, when a VM
next joins the network (a VM's port listens again once its peer is gone).

Addresses: each network has a /24 (``10.42.N.0/24`` by default, the first
N not used by another network here); VMs get ``.2`` upwards, in meta.json
of the network (``hosts``) and of the VM; the guest's boot script sets them
on its NICs in order (eth1, eth2 …; eth0 is the user network).

Everything here is blocking (file, QMP and process work): the driver calls
it from worker threads under its lock.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .base import DriverError, NotFound

#: The default networks: 10.42.N.0/24, N = 1 … 254.
DEFAULT_PREFIX = "10.42"
#: The private IPv4 ranges a network's cidr must lie in (RFC 1918).
PRIVATE = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
#: The longest unix socket path (struct sockaddr_un's sun_path, less the NUL).
SUN_PATH_MAX = 107
#: Seconds the hub may take to connect to a VM's port.
CONNECT_TIMEOUT = 3.0


@dataclass
class Net:
    """One network's meta.json plus its paths."""

    name: str
    id: str
    cidr: str
    created: str
    metadata: dict[str, str]
    dir: Path
    #: server id → address (no prefix length)
    hosts: dict[str, str] = field(default_factory=dict)

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        return self.dir / "hub.pid"

    def port(self, server_id: str) -> Path:
        """The unix socket of ``server_id``'s port (short: sun_path holds 107
        bytes; DriverError(ENAMETOOLONG) when the state dir makes it longer)."""
        import errno

        path = self.dir / f"{server_id.removeprefix('vm-')}.sock"
        if len(os.fsencode(path)) > SUN_PATH_MAX:
            raise DriverError(f"the state dir's path is too long for a unix socket: {path}",
                              errno=errno.ENAMETOOLONG)
        return path

    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.cidr).prefixlen

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "id": self.id, "cidr": self.cidr, "created": self.created,
                           "metadata": self.metadata, "hosts": self.hosts}, indent=2) + "\n"

    @classmethod
    def load(cls, d: Path) -> "Net | None":
        """The network of directory ``d``, or None (missing or malformed)."""
        try:
            m = json.loads((d / "meta.json").read_bytes())
            hosts = {str(k): str(ipaddress.ip_address(v)) for k, v in dict(m.get("hosts", {})).items()}
            ipaddress.ip_network(m["cidr"])
            return cls(name=str(m["name"]), id=str(m["id"]), cidr=str(m["cidr"]), created=str(m["created"]),
                       metadata={str(k): str(v) for k, v in dict(m["metadata"]).items()}, dir=d, hosts=hosts)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self) -> None:
        tmp = self.dir / "meta.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, self.dir / "meta.json")


def pick_cidr(taken: list[str]) -> str:
    """The first ``10.42.N.0/24`` that overlaps none of ``taken``.
    DriverError when all 254 are used."""
    used = [ipaddress.ip_network(c) for c in taken]
    for n in range(1, 255):
        net = ipaddress.ip_network(f"{DEFAULT_PREFIX}.{n}.0/24")
        if not any(net.overlaps(u) for u in used):
            return str(net)
    raise DriverError("no free 10.42.N.0/24 left for a network")


def check_cidr(cidr: str, taken: list[str]) -> str:
    """``cidr`` normalised: an IPv4 private network of /16 to /29 that
    overlaps neither the user network nor ``taken``.  DriverError(EINVAL)."""
    import errno

    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise DriverError(f"bad cidr {cidr!r}", errno=errno.EINVAL) from None
    if net.version != 4 or not any(net.subnet_of(p) for p in PRIVATE) or not 16 <= net.prefixlen <= 29:
        raise DriverError(f"cidr {cidr!r}: use a private (RFC 1918) IPv4 network of /16 to /29",
                          errno=errno.EINVAL)
    for other in ["10.0.2.0/24", *taken]:
        if net.overlaps(ipaddress.ip_network(other)):
            raise DriverError(f"cidr {cidr!r} overlaps {other}", errno=errno.EINVAL)
    return str(net)


def allocate(net: Net, server_id: str) -> str:
    """The address of ``server_id`` on ``net`` (kept if it has one), the
    lowest free from .2 up.  DriverError when the network is full."""
    if server_id in net.hosts:
        return net.hosts[server_id]
    used = set(net.hosts.values())
    hosts = ipaddress.ip_network(net.cidr).hosts()
    next(hosts, None)  # .1 is left for a gateway one may add
    for ip in hosts:
        if str(ip) not in used:
            net.hosts[server_id] = str(ip)
            return str(ip)
    raise DriverError(f"network {net.name} is full ({len(used)} VMs)")


def hub_argv(qemu: str, net: Net) -> list[str]:
    """The hub QEMU's command line: no machine, no devices, QMP, daemonized,
    seccomp.  It stays the daemon's user (no -runas): it connects to the
    VMs' ports in the state dir, which only that user can reach; it runs
    no guest code, only QEMU's hub, which floods Ethernet frames."""
    return [qemu, "-name", f"cloudfs-net-{net.name}", "-machine", "none", "-nodefaults", "-display", "none",
            "-qmp", f"unix:{net.qmp},server=on,wait=off", "-pidfile", str(net.pidfile), "-daemonize",
            "-sandbox", "on,obsolete=deny,resourcecontrol=deny"]


def qemu_running(pid: int, marker: str) -> bool:
    """True when ``pid`` runs a qemu-system binary whose command line contains
    ``marker`` and is not a zombie (pids get reused)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        if stat[stat.rindex(b")") + 2:][:1] in (b"Z", b"X"):
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError):
        return False
    return bool(argv) and Path(argv[0].decode(errors="replace")).name.startswith("qemu-system") \
        and any(marker.encode() in a for a in argv)


def hub_pid(net: Net) -> int | None:
    """The hub's pid if it runs (a qemu-system naming this network's QMP socket)."""
    try:
        pid = int(net.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if qemu_running(pid, str(net.qmp)) else None


def start_hub(qemu: str, net: Net) -> None:
    """Start the network's hub.  DriverError with QEMU's message if it fails."""
    for p in (net.qmp, net.pidfile):
        p.unlink(missing_ok=True)
    try:
        p = subprocess.run(hub_argv(qemu, net), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, start_new_session=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DriverError(f"cannot start the hub of network {net.name}: {e}") from e
    if p.returncode != 0 or hub_pid(net) is None:
        err = (p.stderr or b"").decode(errors="replace").strip()[-500:]
        raise DriverError(f"the hub of network {net.name} failed to start: {err or p.returncode}")


def stop_hub(net: Net, qmp) -> None:
    """End the hub (QMP quit, SIGKILL after 3 s)."""
    pid = hub_pid(net)
    if pid is None:
        return
    with contextlib.suppress(DriverError):
        qmp(net.qmp, "quit", timeout=2.0)
    deadline = time.monotonic() + 3
    while hub_pid(net) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    if hub_pid(net) is not None:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def add_port(net: Net, server_id: str, qmp) -> Path:
    """Join ``server_id``'s NIC to the hub: its QEMU listens on
    ``net.port(server_id)`` (``-netdev stream,server=on``) and the hub
    connects there (a ``stream`` client joined to hub 0), replacing any old
    port.  The hub is the one that connects because it runs for good: a
    VM's QEMU daemonizes after its netdevs are made, and QEMU 7.2's stream
    client connects from a thread the fork leaves behind (the connection
    shows "connection error").  QEMU reports a failed connect only in ``info
    network``, so that is watched for CONNECT_TIMEOUT seconds.  DriverError
    (QmpError) if the hub refuses or does not connect."""
    remove_port(net, server_id, qmp, unlink=False)
    sock = net.port(server_id)
    qmp(net.qmp, "netdev_add", {"type": "stream", "id": f"s-{server_id}", "server": False,
                                "addr": {"type": "unix", "path": str(sock)}})
    qmp(net.qmp, "netdev_add", {"type": "hubport", "id": f"h-{server_id}", "hubid": 0,
                                "netdev": f"s-{server_id}"})
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        info = str(qmp(net.qmp, "human-monitor-command", {"command-line": "info network"}))
        line = next((ln for ln in info.splitlines() if f"s-{server_id}:" in ln), "")
        if "unix:" in line:
            return sock
        if "connection error" in line or time.monotonic() > deadline:
            remove_port(net, server_id, qmp, unlink=False)
            raise DriverError(f"the hub of network {net.name} cannot connect to {server_id}'s port")
        time.sleep(0.05)


def remove_port(net: Net, server_id: str, qmp, unlink: bool = True) -> None:
    """Remove ``server_id``'s port if the hub has one (errors ignored), and
    its socket when ``unlink``."""
    for dev in (f"h-{server_id}", f"s-{server_id}"):
        with contextlib.suppress(DriverError):
            qmp(net.qmp, "netdev_del", {"id": dev}, timeout=3.0)
    if unlink:
        net.port(server_id).unlink(missing_ok=True)


def remove_dir(net: Net) -> None:
    shutil.rmtree(net.dir, ignore_errors=True)


def mac_of(address: str) -> str:
    """The MAC of the NIC with IPv4 ``address``: 52:54 and its four bytes,
    locally administered and unique on its network (the hub floods by
    frame, so two equal MACs would confuse the guests' ARP)."""
    return "52:54:" + ":".join(f"{b:02x}" for b in ipaddress.ip_address(address).packed)


__all__ = ["Net", "pick_cidr", "check_cidr", "allocate", "start_hub", "stop_hub", "hub_pid", "add_port",
           "remove_port", "remove_dir", "mac_of", "NotFound"]
