"""The compute driver interface: what the reconciler asks a cloud to do.

All methods are async and must not block the trio loop.  Errors:
:class:`DriverError` (the backend refused or failed; errno EIO, or EAGAIN
when it did not answer in time; the message is shown in the process's
``status`` as its error), :class:`NotFound` (no such server, image, flavor
or network; ENOENT).  Both are :class:`ninep.errors.FsError`, so a driver
failure that reaches a file operation is answered like any other error,
with the driver's message.  ``delete``, ``stop`` and ``start`` are
idempotent: deleting a server that is gone, stopping a stopped one, are not
errors.

A driver serves one deployment at a time (:meth:`ComputeDriver.bind`, done
by cloudfs.namespace with the deployment's unique id from ZooKeeper): every
server it makes carries the id in its metadata, and it never finds, adopts,
rebuilds, powers or deletes a server that does not carry it (NotOurs, a
NotFound), so
two deployments on one cloud (one OpenStack project, one QEMU state dir)
never touch each other's servers.

The semantics follow OpenStack Nova's server actions (create, delete, stop,
start, rebuild) and Glance/Neutron listings.
"""

from __future__ import annotations

import abc
import errno
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import trio

from ninep.errors import FsError

#: Metadata every server cloudfs creates carries (Nova server metadata on
#: OpenStack), so a daemon recognises its servers and finds one again after a
#: lost reply or a crash: the deployment's unique id, pid and ppid, and the
#: deployment's ZooKeeper root (for people reading server lists; never matched).
META_DEPLOYMENT = "cloudfs-deployment"
META_PID = "cloudfs-pid"
META_PPID = "cloudfs-ppid"
META_ROOT = "cloudfs-root"
#: Given to ``create`` only (never searched, never in a server listing a
#: driver returns): the process's 9P credential (cloudfs.identity).  A driver
#: hands it to the guest at boot without putting it in the user-data (QEMU: a
#: file in the VM's initramfs).
META_SECRET = "cloudfs-secret"


class DriverError(FsError):
    """The backend failed; ``str(e)`` and ``e.message`` are a message for
    the user.  ``errno`` is EIO, or EAGAIN for a call that did not answer
    within its deadline (try again)."""

    def __init__(self, message: str = "", *, errno: int = errno.EIO):
        super().__init__(errno, message or "the compute driver failed")

    def __str__(self) -> str:
        return self.message


class NotFound(DriverError):
    """No such server, image, flavor or network (ENOENT)."""

    def __init__(self, message: str = ""):
        super().__init__(message or "not found", errno=errno.ENOENT)


class NotOurs(NotFound):
    """The server exists but belongs to another deployment (ENOENT: to
    this deployment it does not exist); nothing was done to it."""


class DriverTimeout(DriverError):
    """The backend did not answer within the call's deadline (EAGAIN)."""

    def __init__(self, message: str = ""):
        super().__init__(message or "the compute driver timed out", errno=errno.EAGAIN)


@dataclass(frozen=True)
class Image:
    """An image: ``size`` in bytes, ``created`` ISO 8601 UTC;
    ``container_format`` as Glance has it (``""`` where the driver has none)."""

    id: str
    name: str
    status: str
    size: int
    disk_format: str
    checksum: str
    created: str
    container_format: str = ""


@dataclass(frozen=True)
class Network:
    """A network: ``cidr`` like ``10.0.0.0/24``; status ``active`` …"""

    id: str
    name: str
    cidr: str
    status: str


@dataclass(frozen=True)
class Server:
    """A VM as the backend sees it: ``status`` is ``creating`` (still
    building), ``running``, ``stopped``, ``exited`` (it shut itself down),
    ``killed`` (deleted outside cloudfs), ``error``, or ``unknown`` (the
    backend cannot tell now: cloudfs then changes nothing); ``addresses``
    IPv4 addresses as text; ``message`` why it exited or failed."""

    id: str
    name: str
    status: str
    host: str
    addresses: tuple[str, ...] = field(default=())
    message: str = ""


@dataclass(frozen=True)
class ServerStats:
    """What a VM uses, as the backend can tell (None where it cannot):
    ``cpu_ns`` guest vCPU time (ns), ``memory_bytes`` memory given to the
    VM, ``memory_used_bytes`` what the guest uses, block and network
    counters (bytes, operations, packets, since the VM started) and
    ``uptime_s`` (whole seconds).  Lines of ``/proc/<pid>/stats``."""

    cpu_ns: int | None = None
    memory_bytes: int | None = None
    memory_used_bytes: int | None = None
    block_read_bytes: int | None = None
    block_write_bytes: int | None = None
    block_read_ops: int | None = None
    block_write_ops: int | None = None
    net_rx_bytes: int | None = None
    net_tx_bytes: int | None = None
    net_rx_packets: int | None = None
    net_tx_packets: int | None = None
    uptime_s: int | None = None

    def text(self) -> bytes:
        """``key value`` lines in field order, ``-`` where unknown."""
        return "".join(f"{f.name} {'-' if getattr(self, f.name) is None else getattr(self, f.name)}\n"
                       for f in fields(self)).encode()


@dataclass(frozen=True)
class ServerSpec:
    """What a process asks for when its server is made: ``pid``/``ppid``
    (tag the server), ``name`` (a label), ``image``, ``flavor`` (``""``: the
    driver's default), ``networks`` (empty: the default network),
    ``userdata`` bytes and ``secret`` (META_SECRET: for the guest only);
    ``snapshot`` a snapshot id from :meth:`ComputeDriver.snapshot` (``fork
    live``: restore the copy instead of booting ``image``)."""

    pid: int
    ppid: int
    name: str
    image: str
    flavor: str = ""
    networks: tuple[str, ...] = ()
    userdata: bytes = b""
    secret: str = field(default="", repr=False)
    snapshot: str = ""


def server_metadata(deployment: str, pid: int, ppid: int, root: str = "") -> dict[str, str]:
    """The metadata marking a server as process ``pid`` (child of ``ppid``)
    of deployment ``deployment`` (its unique id): META_DEPLOYMENT, META_PID,
    META_PPID, and META_ROOT when ``root`` is given.  The one place these
    are composed."""
    md = {META_DEPLOYMENT: deployment, META_PID: str(pid), META_PPID: str(ppid)}
    if root:
        md[META_ROOT] = root
    return md


class ComputeDriver(abc.ABC):
    """A compute backend.  One instance may be shared by several daemons of
    one deployment (it stands for one cloud).

    ``scope`` says which daemons can act on its servers: daemons whose
    drivers have equal scopes see the same servers (one OpenStack project:
    any of them may adopt a process whose daemon went away); a QEMU
    driver's scope is its host and state dir, so a VM process is only ever
    acted on by the daemon that runs it.  Recorded with each process
    when its server is made (:attr:`cloudfs.process.Process.scope`).

    ``deployment`` is the id given to :meth:`bind` (None before: the driver
    then makes no server and matches none)."""

    scope: str = "shared"
    #: what ``/hosts`` calls this kind of driver (``cloudfs up --driver``)
    kind: str = "driver"
    #: whether :meth:`migrate` can move servers (live migration between
    #: the cloud's compute hosts); False: ``migrate`` is EOPNOTSUPP
    migrates: bool = False
    deployment: str | None = None
    #: the deployment's ZooKeeper root, written as META_ROOT (informational)
    deployment_root: str = ""

    def bind(self, deployment: str, root: str = "") -> None:
        """Serve deployment ``deployment`` (its unique id; ``root`` its
        ZooKeeper root, for people).  ValueError if the driver already
        serves another deployment."""
        if self.deployment is not None and self.deployment != deployment:
            raise ValueError(f"driver already serves deployment {self.deployment}, not {deployment}")
        self.deployment = deployment
        self.deployment_root = root

    def metadata_for(self, spec: ServerSpec) -> dict[str, str]:
        """The metadata of ``spec``'s server in the bound deployment.
        DriverError when the driver is not bound."""
        return server_metadata(self.bound(), spec.pid, spec.ppid, self.deployment_root)

    def bound(self) -> str:
        """The bound deployment id; DriverError if there is none."""
        if self.deployment is None:
            raise DriverError("the compute driver serves no deployment yet")
        return self.deployment

    def ours(self, metadata: Mapping[str, str]) -> bool:
        """Whether a server with ``metadata`` belongs to the bound deployment."""
        return self.deployment is not None and metadata.get(META_DEPLOYMENT) == self.deployment

    @abc.abstractmethod
    async def create(self, spec: ServerSpec) -> Server:
        """Find or create the server of process ``spec.pid``: idempotent by
        (deployment, pid).  If the deployment already has a live server
        tagged with that pid (a create whose reply was lost, a daemon killed
        mid-boot, a racing create) it is returned (adopted; a driver may
        first wait for it to settle), else one is booted with
        :func:`server_metadata` and ``spec.secret`` for the guest.  Returns
        it ``running`` (or ``stopped`` if an adopted one is).  NotFound for
        an unknown image/flavor/network, DriverError if the boot fails."""

    @abc.abstractmethod
    async def find(self, pid: int) -> list[Server]:
        """Every server of the bound deployment tagged with ``pid``, in any
        status, oldest first; no side effects.  For ending a process whose
        record names no server (a create whose reply was lost)."""

    @abc.abstractmethod
    async def rebuild(self, server_id: str, image: str, userdata: bytes, *, secret: str = "") -> Server:
        """Rebuild in place from ``image`` keeping id and addresses (Nova
        rebuild), handing the guest ``secret`` (META_SECRET; "" keeps the
        old one); NotFound for an unknown server (or another deployment's)."""

    @abc.abstractmethod
    async def delete(self, server_id: str) -> None:
        """Terminate and remove; no error if already gone.  NotFound for
        another deployment's server (which is left alone)."""

    @abc.abstractmethod
    async def stop(self, server_id: str) -> Server:
        """Power off (Nova os-stop); NotFound if it does not exist."""

    @abc.abstractmethod
    async def start(self, server_id: str) -> Server:
        """Power on (Nova os-start); NotFound if it does not exist."""

    @abc.abstractmethod
    async def status(self, server_id: str) -> Server:
        """The server now; NotFound if it does not exist (or is another
        deployment's)."""

    async def run(self) -> None:
        """The driver's background work while a daemon serves (run in the
        daemon's nursery, cancelled at its end; e.g. the QEMU driver keeps
        its consoles bounded).  The default has none."""
        await trio.sleep_forever()

    async def snapshot(self, server_id: str) -> str:
        """Copy the running server's memory and disks for a ``fork live``
        child (the server keeps running, paused at most briefly); returns
        the snapshot's id, which :meth:`create` takes as
        ``ServerSpec.snapshot`` (once: a create consumes it) and
        :meth:`discard_snapshot` removes.  NotFound if there is no such
        server; DriverError EBUSY while it is being copied already, EAGAIN
        when the driver holds too many snapshots, EOPNOTSUPP from drivers
        (or for servers) that cannot.  The default cannot (Nova has no
        memory clone)."""
        raise DriverError("this compute driver cannot copy a running server (fork live)", errno=errno.EOPNOTSUPP)

    async def migrate(self, server_id: str, host: str) -> Server:
        """Live-migrate the running server to compute host ``host`` of the
        same cloud (Nova's os-migrateLive with ``block_migration: auto``)
        and return it once it runs there (``host`` the new host), or
        DriverError: EINVAL for an unknown host or the host it is on,
        EBUSY while it is moving or not running, EOPNOTSUPP from drivers
        that cannot (a QEMU VM moves between daemons instead:
        cloudfs.moves), EIO if the migration failed (the server then runs
        where it was), EAGAIN if it did not finish within the driver's
        deadline.  NotFound if there is no such server.  The default cannot."""
        raise DriverError("this compute driver cannot move a server to another host", errno=errno.EOPNOTSUPP)

    async def discard_snapshot(self, snapshot_id: str) -> None:
        """Remove snapshot ``snapshot_id`` (no error if it is gone or
        malformed).  The default has none."""

    async def stats(self, server_id: str) -> ServerStats:
        """What the server uses now (one sample); fields the backend cannot
        tell are None.  NotFound if it does not exist (or is another
        deployment's).  The default knows nothing."""
        await self.status(server_id)
        return ServerStats()

    async def console(self, server_id: str, limit: int) -> bytes:
        """The last ``limit`` bytes (at most) the server wrote to its
        console (QEMU's serial port, Nova's console output).  NotFound if
        it does not exist.  The default has none (empty)."""
        await self.status(server_id)
        return b""

    @abc.abstractmethod
    async def list_images(self) -> list[Image]:
        """Images that ``create`` accepts, by name."""

    @abc.abstractmethod
    async def list_flavors(self) -> list[str]:
        """Flavor names that ``create`` accepts; the first is the default."""

    @abc.abstractmethod
    async def list_networks(self) -> list[Network]:
        """Networks; the first is the default for processes that name none."""

    @abc.abstractmethod
    async def create_network(self, name: str, cidr: str | None = None) -> Network:
        """Create a network (``cidr`` None: the driver picks a free /24).
        DriverError if the name is taken."""

    async def delete_network(self, name: str) -> None:
        """Delete network ``name``.  NotFound if there is none;
        DriverError(EBUSY) while a server is on it; DriverError(EOPNOTSUPP)
        from drivers that cannot."""
        raise DriverError("this compute driver cannot delete networks", errno=errno.EOPNOTSUPP)
