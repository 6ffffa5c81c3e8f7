"""The compute driver interface: what the reconciler asks a cloud to do.

All methods are async and must not block the trio loop.  Errors:
:class:`DriverError` (the backend refused or failed; the message is shown in
the process's ``status`` as its error), :class:`NotFound` (no such server,
image, flavor or network).  ``delete``, ``stop`` and ``start`` are idempotent:
deleting a server that is gone, stopping a stopped one, are not errors.

The semantics follow OpenStack Nova's server actions (create, delete, stop,
start, rebuild) and Glance/Neutron listings.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field

#: Metadata every server cloudfs creates carries (Nova server metadata on
#: OpenStack), so a daemon recognises its servers and finds one again after a
#: lost reply or a crash: the deployment (its ZooKeeper root), pid and ppid.
META_DEPLOYMENT = "cloudfs-deployment"
META_PID = "cloudfs-pid"
META_PPID = "cloudfs-ppid"
#: Passed to ``create`` only (never searched by ``find``): the process's 9P
#: credential (cloudfs.identity).  A driver hands it to the guest at boot
#: without putting it in the user-data (QEMU: a file in the VM's initramfs).
META_SECRET = "cloudfs-secret"


class DriverError(Exception):
    """The backend failed; ``str(e)`` is a message for the user."""


class NotFound(DriverError):
    """No such server, image, flavor or network."""


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
    """A VM as the backend sees it: ``status`` is ``running``, ``stopped``,
    ``exited`` (it shut itself down) or ``error``; ``addresses`` IPv4
    addresses as text; ``message`` why it exited or failed."""

    id: str
    name: str
    status: str
    host: str
    addresses: tuple[str, ...] = field(default=())
    message: str = ""


class ComputeDriver(abc.ABC):
    """A compute backend.  One instance may be shared by several daemons
    (it stands for one cloud).

    ``scope`` says which daemons can act on its servers: daemons whose
    drivers have equal scopes see the same servers (one OpenStack project:
    any of them may adopt a process whose daemon went away); a QEMU
    driver's scope is its host and state dir, so a VM process is only ever
    acted on by the daemon that runs its VM.  Recorded with each process
    when its server is made (:attr:`cloudfs.process.Process.scope`)."""

    scope: str = "shared"

    @abc.abstractmethod
    async def create(self, name: str, image: str, flavor: str, networks: list[str], userdata: bytes, *,
                     metadata: Mapping[str, str]) -> Server:
        """Boot a server carrying ``metadata`` (at least META_DEPLOYMENT,
        META_PID, META_PPID; a driver may pass further keys to the guest);
        returns it running.  NotFound for an unknown image/flavor/network,
        DriverError if the boot fails."""

    @abc.abstractmethod
    async def find(self, metadata: Mapping[str, str]) -> Server | None:
        """The server whose metadata has every key/value of ``metadata``, or
        None.  The reconciler asks before every create, so a create whose
        reply was lost, or a daemon killed mid-boot, never leaves a duplicate
        (the server is adopted instead)."""

    @abc.abstractmethod
    async def rebuild(self, server_id: str, image: str, userdata: bytes) -> Server:
        """Rebuild in place from ``image`` keeping id and addresses (Nova rebuild)."""

    @abc.abstractmethod
    async def delete(self, server_id: str) -> None:
        """Terminate and remove; no error if already gone."""

    @abc.abstractmethod
    async def stop(self, server_id: str) -> Server:
        """Power off (Nova os-stop); NotFound if it does not exist."""

    @abc.abstractmethod
    async def start(self, server_id: str) -> Server:
        """Power on (Nova os-start); NotFound if it does not exist."""

    @abc.abstractmethod
    async def status(self, server_id: str) -> Server:
        """The server now; NotFound if it does not exist."""

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
