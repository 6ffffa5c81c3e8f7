"""The OpenStack compute driver: processes are Nova servers, ``/images`` is
Glance and ``/net`` is Neutron, through openstacksdk.

Semantics follow the OpenStack APIs (Compute API v2.1 with microversions,
Image API v2, Networking API v2.0):

- ``create`` is find-or-create by (deployment id, pid), the one place
  servers are adopted: a live server of the deployment tagged with the pid
  (a create whose reply was lost, a daemon killed mid-boot) is adopted and
  waited for; failed ones are deleted; otherwise it boots a server (Nova
  ``POST /servers``) with user data base64 encoded by us and server
  metadata (``cloudfs-deployment`` = the deployment's unique id,
  ``cloudfs-pid``, ``cloudfs-ppid``, ``cloudfs-root``, and
  ``cloudfs-secret``, which reaches the guest through the metadata
  service), plus two tags that index it by deployment and pid; it waits for
  ``ACTIVE``, then deletes any younger duplicate of the pid, so one pid
  never keeps two servers.  A boot ending in ``ERROR`` is deleted and raises
  DriverError with Nova's fault message (e.g. "No valid host was found. …").
- ``find`` lists the deployment's servers of a pid, any status, no side
  effects.  Every action on a server id (delete, rebuild, stop, start,
  migrate, status) first checks that the server carries this deployment's
  id, and is NotFound otherwise: other deployments' servers are never
  touched.
- ``rebuild`` is Nova rebuild (microversion ≥ 2.57 carries user data);
  ``delete`` waits until the server is gone; ``stop``/``start`` are the
  os-stop/os-start actions, idempotent.
- ``migrate`` is live migration (os-migrateLive, microversion 2.30: a named
  host the scheduler still checks, ``block_migration: auto``) to another
  nova-compute host, waiting until the server is ACTIVE there; the host a
  server is on is Nova's ``OS-EXT-SRV-ATTR:host`` (shown to admins).
- ``status`` maps Nova's status: BUILD/REBUILD → ``creating``, ACTIVE →
  ``running``, SHUTOFF (and PAUSED, SUSPENDED, SHELVED*) → ``stopped``,
  ERROR → ``error`` (Nova's fault message in ``message``), DELETED and
  SOFT_DELETED → ``killed``, anything else (UNKNOWN while nova-compute is
  down …) → ``unknown``; a server that no longer exists is NotFound.
  Addresses come from the server's Neutron ports (IPv4 fixed IPs).

Every SDK call runs in a worker thread (``trio.to_thread.run_sync`` through
one CapacityLimiter) under a deadline; a call that exceeds it, and every
cloud error (quota, NoValidHost, image missing, auth failure, unreachable
endpoint), becomes :class:`DriverError` (or :class:`NotFound`) carrying the
cloud's message.  Nothing blocks the trio loop.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import errno
import hashlib
import ipaddress
import logging
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Callable, TypeVar

import trio

from .base import (
    META_DEPLOYMENT, META_PID, META_PPID, META_SECRET, ComputeDriver, DriverError, DriverTimeout, Image, Network,
    NotFound, NotOurs, Server, ServerSpec, ServerStats,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["OpenStackDriver", "OSServer", "OSImage", "OSNetwork", "META_DEPLOYMENT", "META_PID", "META_PPID"]

#: Nova status → cloudfs state.
STATES = {
    "BUILD": "creating", "REBUILD": "creating",
    "ACTIVE": "running", "REBOOT": "running", "HARD_REBOOT": "running",
    "PASSWORD": "running", "MIGRATING": "running", "RESIZE": "running",
    "VERIFY_RESIZE": "running", "REVERT_RESIZE": "running", "RESCUE": "running",
    "SHUTOFF": "stopped", "PAUSED": "stopped", "SUSPENDED": "stopped",
    "SHELVED": "stopped", "SHELVED_OFFLOADED": "stopped",
    "ERROR": "error",
    "DELETED": "killed", "SOFT_DELETED": "killed",
}

#: Nova's limit on user data (bytes after base64 encoding).
MAX_USERDATA_B64 = 65535


@dataclass(frozen=True)
class OSServer(Server):
    """A Nova server: the base :class:`Server` (``message`` is Nova's fault
    message when ``status`` is ``error``) plus ``nova_status`` (Nova's own
    word, e.g. ``BUILD``), ``task_state``, ``metadata`` and ``created``
    (ISO 8601)."""

    nova_status: str = ""
    task_state: str | None = None
    metadata: dict[str, str] = field(default_factory=dict, compare=False)
    created: str = ""


@dataclass(frozen=True)
class OSImage(Image):
    """A Glance image (the base :class:`Image`, with ``container_format`` set)."""


@dataclass(frozen=True)
class OSNetwork(Network):
    """A Neutron network: ``cidr`` is its first IPv4 subnet's CIDR (``""``
    without one); ``cidrs`` all its subnets' CIDRs; ``subnets`` their ids."""

    cidrs: tuple[str, ...] = ()
    subnets: tuple[str, ...] = ()


def _message(e: BaseException) -> str:
    """The cloud's own words for an SDK/keystoneauth exception."""
    details = getattr(e, "details", None)
    status = getattr(e, "status_code", None)
    text = str(details) if details else (str(e) or type(e).__name__)
    text = " ".join(text.split())
    if status:
        return f"{text} (HTTP {status})"
    return text


#: How far back (seconds) a ``changes-since`` poll reaches before the
#: ``updated`` stamp it starts from.  Nova's stamps have whole seconds, and
#: a server with no ``updated_at`` yet (a build request; one just moved to
#: cell0 with NoValidHost) is shown with the API's *current* time, so an
#: update stored a moment earlier can carry an older stamp than one already
#: seen; polling from the stamp itself would skip it for ever.
SINCE_MARGIN = 5.0

#: A waiting operation also GETs its server directly when this many seconds
#: passed without a direct look: a safety net under the shared poll.
RECHECK_INTERVAL = 10.0


def _earlier(stamp: str, seconds: float) -> str:
    """An ISO 8601 UTC stamp as Nova writes it (``2026-11-21T09:26:35Z``),
    ``seconds`` earlier; unparsable stamps are returned unchanged."""
    try:
        t = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp
    t -= datetime.timedelta(seconds=seconds)
    return t.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _diagnostics_stats(raw: Any) -> ServerStats:
    """ServerStats from a diagnostics body of microversion ≥ 2.48 (Nova's
    api-ref "Show Server Diagnostics"); anything malformed is unknown."""
    def num(v: Any) -> int | None:
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 else None

    def total(items: Any, key: str) -> int | None:
        if not isinstance(items, list) or not items:
            return None
        vals = [num(i.get(key)) if isinstance(i, dict) else None for i in items]
        return None if None in vals else sum(vals)  # type: ignore[arg-type]

    if not isinstance(raw, dict):
        return ServerStats()
    mem = raw.get("memory_details") if isinstance(raw.get("memory_details"), dict) else {}
    mib = lambda v: None if num(v) is None else num(v) << 20  # noqa: E731
    disks, nics = raw.get("disk_details"), raw.get("nic_details")
    return ServerStats(
        cpu_ns=total(raw.get("cpu_details"), "time"),
        memory_bytes=mib(mem.get("maximum")), memory_used_bytes=mib(mem.get("used")),
        block_read_bytes=total(disks, "read_bytes"), block_write_bytes=total(disks, "write_bytes"),
        block_read_ops=total(disks, "read_requests"), block_write_ops=total(disks, "write_requests"),
        net_rx_bytes=total(nics, "rx_octets"), net_tx_bytes=total(nics, "tx_octets"),
        net_rx_packets=total(nics, "rx_packets"), net_tx_packets=total(nics, "tx_packets"),
        uptime_s=num(raw.get("uptime")),
    )


def _cloud_scope(conn: Any) -> str:
    """``openstack!<keystone>!<region>!<project>`` from the connection's
    settings (no API call): daemons on one project of one region see the
    same servers.  The Keystone URL loses its trailing ``/`` and ``/v3``;
    the project is its id, else ``<domain>/<name>``, else the application
    credential's id.  Give the daemons of a deployment the same clouds.yaml
    entry: spelled differently (an id here, a name there) the scopes differ
    and they do not take over each other's processes."""
    try:
        auth = dict(conn.config.config.get("auth") or {})
        region = str(conn.config.region_name or "")
    except AttributeError:
        auth, region = {}, ""
    url = str(auth.get("auth_url") or "").rstrip("/")
    if url.endswith("/v3"):
        url = url[:-3]
    project = str(auth.get("project_id") or "")
    if not project and auth.get("project_name"):
        domain = auth.get("project_domain_id") or auth.get("project_domain_name") or "default"
        project = f"{str(domain).lower()}/{auth['project_name']}"
    if not project:
        project = str(auth.get("application_credential_id") or auth.get("application_credential_name") or "")
    return f"openstack!{url}!{region}!{project}"


class _Watch:
    """What the shared poller last saw of one server (``gone``: Nova has
    it no more) and Nova's ``updated`` stamp of it."""

    __slots__ = ("server", "gone", "updated", "refs")

    def __init__(self) -> None:
        self.server: OSServer | None = None
        self.gone = False
        self.updated = ""
        self.refs = 0

    def see(self, server: OSServer | None, updated: str | None) -> None:
        self.server = server
        self.gone = server is None
        if updated:
            self.updated = max(self.updated, updated)


def _live(s: OSServer) -> bool:
    """A server worth adopting: not failed, deleted or being deleted."""
    return s.status in ("creating", "running", "stopped") and s.task_state != "deleting"


class OpenStackDriver(ComputeDriver):
    """Nova/Glance/Neutron behind the :class:`ComputeDriver` interface.

    ``conn`` is an ``openstack.connection.Connection``.  ``deployment`` is
    the deployment id written in server metadata (servers of other
    deployments are never touched); None until :meth:`bind` gives it (the
    daemon does, with the id kept in ZooKeeper).  ``timeout`` (seconds) bounds each API
    call, ``boot_timeout`` a whole boot/rebuild/stop/start/delete until its
    final state; ``poll_interval`` (seconds) is how often a waiting operation
    asks Nova; ``concurrency`` is the number of API calls in flight at once.
    """

    kind = "openstack"
    migrates = True  # Nova live migration between the cloud's compute hosts

    def __init__(self, conn: Any, *, deployment: str | None = None, timeout: float = 60.0,
                 boot_timeout: float = 600.0, poll_interval: float = 0.5, concurrency: int = 16,
                 cache_ttl: float = 30.0):
        self.conn = conn
        self.scope = _cloud_scope(conn)
        self.deployment = deployment
        self.timeout = timeout
        self.boot_timeout = boot_timeout
        self.poll_interval = poll_interval
        self.limiter = trio.CapacityLimiter(concurrency)
        self.cache_ttl = cache_ttl
        self._cache: dict[str, tuple[float, dict[str, str]]] = {}
        self._cache_locks: dict[str, trio.Lock] = {}
        self._watches: dict[str, _Watch] = {}
        self._polling = False
        self._round_no = 0
        self._last_round = -1e9
        self._round_done = trio.Event()
        self._warm = False
        self._warm_lock = threading.Lock()

    @classmethod
    def from_cloud(cls, cloud: str | None = None, **kwargs: Any) -> "OpenStackDriver":
        """Pick the cloud the way python-openstackclient does: ``cloud`` names
        an entry of clouds.yaml (``OS_CLIENT_CONFIG_FILE``, ./clouds.yaml,
        ~/.config/openstack, /etc/openstack); None means ``OS_CLOUD`` or the
        ``OS_*`` variables (``openstack.connect(cloud=...)``).  Reads config
        files only (no network traffic until the first call); call it before
        or outside the trio loop.  ``kwargs`` go to :class:`OpenStackDriver`.
        Raises DriverError when the configuration is unusable."""
        import openstack
        import openstack.exceptions

        timeout = kwargs.get("timeout", 60.0)
        try:
            conn = openstack.connect(cloud=cloud, api_timeout=timeout)
        except (openstack.exceptions.SDKException, KeyError, ValueError) as e:
            raise DriverError(f"openstack: cannot configure cloud {cloud or '(from OS_CLOUD/OS_*)'}: {_message(e)}") from e
        return cls(conn, **kwargs)

    # ------------------------------------------------------------ plumbing

    def _warm_up(self) -> None:
        """Build the service proxies once (openstacksdk creates them lazily,
        which is not safe from several threads at once)."""
        with self._warm_lock:
            if not self._warm:
                self.conn.compute, self.conn.image, self.conn.network  # noqa: B018
                self._warm = True

    async def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one blocking SDK call in a worker thread under the deadline;
        map its exceptions to DriverError/NotFound."""
        import keystoneauth1.exceptions as ksa
        import openstack.exceptions as osx

        def work() -> T:
            if not self._warm:
                self._warm_up()
            return fn(*args, **kwargs)

        try:
            with trio.fail_after(self.timeout):
                return await trio.to_thread.run_sync(work, limiter=self.limiter, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise DriverTimeout(f"openstack: {what} timed out after {self.timeout:g}s") from None
        except osx.NotFoundException as e:
            raise NotFound(f"openstack: {what}: {_message(e)}") from e
        except osx.HttpException as e:
            raise DriverError(f"openstack: {what}: {_message(e)}") from e
        except ksa.Unauthorized as e:
            raise DriverError(f"openstack: {what}: authentication failed: {_message(e)}") from e
        except ksa.ConnectionError as e:
            raise DriverError(f"openstack: {what}: cannot reach the cloud: {_message(e)}") from e
        except (osx.SDKException, ksa.ClientException) as e:
            raise DriverError(f"openstack: {what}: {_message(e)}") from e

    async def _lookup(self, kind: str, key: str, load: Callable[[], dict[str, str]]) -> str:
        """``key`` (a name or an id) → id through a cache refreshed after
        ``cache_ttl`` seconds or on a miss.  NotFound if the cloud has none."""
        def fresh(got: tuple[float, dict[str, str]] | None, since: float) -> bool:
            return got is not None and time.monotonic() - got[0] <= self.cache_ttl and \
                (key in got[1] or got[0] >= since)

        asked = time.monotonic()
        got = self._cache.get(kind)
        if not fresh(got, float("inf")):
            lock = self._cache_locks.setdefault(kind, trio.Lock())
            async with lock:  # one load for concurrent misses
                got = self._cache.get(kind)
                if not fresh(got, asked):
                    got = (time.monotonic(), await self._call(f"list {kind}s", load))
                    self._cache[kind] = got
        try:
            return got[1][key]
        except KeyError:
            if not key:
                raise NotFound(f"openstack: the cloud has no {kind}s") from None
            raise NotFound(f"openstack: no {kind} {key!r}") from None

    def _load_images(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for im in self.conn.image.images():
            if im.status == "active":
                out.setdefault(im.name, im.id)
                out[im.id] = im.id
        return out

    def _load_flavors(self) -> dict[str, str]:
        """Flavor names and ids → ids; ``""`` → the default (smallest)."""
        out: dict[str, str] = {}
        fls = self._sorted_flavors()
        for fl in fls:
            out[fl.name] = fl.id
            out[fl.id] = fl.id
        if fls:
            out[""] = fls[0].id
        return out

    def _load_networks(self) -> dict[str, str]:
        """Network names and ids → ids; ``""`` → the default network."""
        out: dict[str, str] = {}
        nets = self._networks()
        for n in nets:
            out.setdefault(n.name, n.id)
            out[n.id] = n.id
        if nets:
            out[""] = nets[0].id
        return out

    def _server(self, s: Any, addresses: tuple[str, ...] | None = None) -> OSServer:
        nova = (s.status or "").upper()
        fault = s.fault or {}
        error = ""
        if nova == "ERROR":  # empty until Nova has recorded the fault
            error = " ".join(str(fault.get("message") or "").split())
        if addresses is None:
            addrs = []
            for entries in (s.addresses or {}).values():
                for a in entries:
                    if a.get("version") == 4:
                        addrs.append(a["addr"])
            addresses = tuple(addrs)
        host = s.compute_host or s.hypervisor_hostname or s.availability_zone or ""
        return OSServer(id=s.id, name=s.name or "", status=STATES.get(nova, "unknown"), host=host,
                        addresses=addresses, message=error, nova_status=nova, task_state=s.task_state,
                        metadata={k: v for k, v in (s.metadata or {}).items() if k != META_SECRET},
                        created=s.created_at or "")

    def _ports_v4(self, server_id: str) -> tuple[str, ...]:
        addrs = []
        for p in self.conn.network.ports(device_id=server_id):
            for ip in p.fixed_ips or []:
                a = ip.get("ip_address", "")
                try:
                    if ipaddress.ip_address(a).version == 4:
                        addrs.append(a)
                except ValueError:
                    pass
        return tuple(addrs)

    async def _get(self, server_id: str, ports: bool = False) -> OSServer:
        """The server now; NotFound if Nova has none or it is not this
        deployment's (its metadata lacks our id)."""
        s = await self._call(f"get server {server_id}", self.conn.compute.get_server, server_id)
        if not self.ours(s.metadata or {}):
            raise NotOurs(f"openstack: server {server_id} is not deployment {self.deployment}'s")
        addrs = None
        if ports:
            addrs = await self._call(f"ports of server {server_id}", self._ports_v4, server_id)
        return self._server(s, addrs)

    async def _watch(self, server_id: str, done: Callable[[OSServer | None], bool],
                     limit: float, what: str, *,
                     expired: Callable[[str], DriverError] = DriverError) -> OSServer | None:
        """Follow one server until ``done(server)`` (``None``: Nova no longer
        has it) and return that server.  Every waiting operation shares one
        poll per ``poll_interval``: Nova's ``GET /servers/detail?changes-since``
        from the oldest watched server's last ``updated`` (Nova's clock) less
        :data:`SINCE_MARGIN`, so N waiting boots cost one list call per
        interval, not N gets; each waiter also GETs its server every
        :data:`RECHECK_INTERVAL` seconds.
        ``expired(message)`` (a DriverError) after ``limit`` seconds."""
        w = self._watches.get(server_id)
        if w is None:
            w = self._watches[server_id] = _Watch()
        w.refs += 1

        async def look() -> None:
            try:
                raw = await self._call(f"get server {server_id}", self.conn.compute.get_server, server_id)
                w.see(self._server(raw), raw.updated_at)
            except NotFound:
                w.see(None, None)

        try:
            with trio.move_on_after(limit):
                await look()
                looked = time.monotonic()
                while True:
                    if done(w.server if not w.gone else None):
                        return w.server if not w.gone else None
                    await self._next_round()
                    if time.monotonic() - looked >= RECHECK_INTERVAL:
                        looked = time.monotonic()
                        try:
                            await look()
                        except DriverError as e:  # the polls go on; the deadline still holds
                            log.warning("looking at server %s failed: %s", server_id, e)
            last = w.server
            where = f" (still {last.nova_status}, task {last.task_state})" if last and not w.gone else ""
            raise expired(f"openstack: server {server_id} not {what} after {limit:g}s{where}")
        finally:
            w.refs -= 1
            if w.refs == 0:
                self._watches.pop(server_id, None)

    async def _next_round(self) -> None:
        """Return after the next shared poll round (running it if no one else is)."""
        seen = self._round_no
        delay = self._last_round + self.poll_interval - time.monotonic()
        if delay > 0:
            with trio.move_on_after(delay):
                await self._round_done.wait()
            if self._round_no != seen:
                return
        if self._polling:
            await self._round_done.wait()
            return
        self._polling = True
        try:
            await self._poll_round()
        finally:
            self._polling = False
            self._last_round = time.monotonic()
            self._round_no += 1
            ev, self._round_done = self._round_done, trio.Event()
            ev.set()

    async def _poll_round(self) -> None:
        stamps = [w.updated for w in self._watches.values() if w.updated]
        if not stamps:
            return
        since = _earlier(min(stamps), SINCE_MARGIN)
        try:
            changed = await self._call("poll servers", lambda: list(
                self.conn.compute.servers(details=True, changes_since=since)))
        except DriverError as e:  # the next round tries again; each wait has its own deadline
            log.warning("polling Nova failed: %s", e)
            return
        for raw in changed:
            w = self._watches.get(raw.id)
            if w is not None:
                srv = self._server(raw)
                w.see(None if srv.nova_status in ("DELETED", "SOFT_DELETED") else srv, raw.updated_at)

    async def wait(self, server_id: str, states: tuple[str, ...] = ("running",),
                   timeout: float | None = None, *, ports: bool = True,
                   expired: Callable[[str], DriverError] = DriverError) -> OSServer:
        """Wait until the server is in one of ``states`` (cloudfs words) with
        no Nova task under way, and return it (addresses from its ports).
        DriverError with Nova's fault message if it reaches ``error``
        instead, ``expired(message)`` on the deadline (``boot_timeout`` by
        default); NotFound if it disappears."""
        def done(s: OSServer | None) -> bool:
            if s is None:
                raise NotFound(f"openstack: server {server_id} is gone")
            if s.status == "error" and s.task_state is None:
                return True
            return s.status in states and s.task_state is None

        limit = self.boot_timeout if timeout is None else timeout
        srv = await self._watch(server_id, done, limit, "/".join(states), expired=expired)
        assert srv is not None
        if srv.status == "error":
            # the fault comes with GET /servers/{id}; Nova records it just
            # after setting ERROR, so give it a moment
            with trio.move_on_after(5):
                while True:
                    srv = await self._get(server_id)
                    if srv.message:
                        break
                    await trio.sleep(0.25)
            if "error" not in states:
                raise DriverError(srv.message or f"openstack: server {server_id} is in ERROR (Nova gives no fault)")
        if not ports:
            return srv
        return await self._with_ports(srv)

    async def _with_ports(self, srv: OSServer) -> OSServer:
        addrs = await self._call(f"ports of server {srv.id}", self._ports_v4, srv.id)
        return dataclasses.replace(srv, addresses=addrs)

    # ------------------------------------------------------------ servers

    @staticmethod
    def server_tags(metadata: Mapping[str, str]) -> list[str]:
        """Nova server tags (microversion ≥ 2.26 filter, ≥ 2.52 on create)
        that index a server by deployment and by deployment+pid, so finding
        one is a server-side filter: ``cfs-<hash>`` and ``cfs-<hash>-<pid>``
        (``<hash>`` 12 hex digits of SHA-1 of the deployment: tags hold at
        most 60 characters and no ``/`` or ``,``)."""
        h = hashlib.sha1(metadata[META_DEPLOYMENT].encode()).hexdigest()[:12]
        tags = [f"cfs-{h}"]
        if META_PID in metadata:
            tags.append(f"cfs-{h}-{metadata[META_PID]}"[:60])
        return tags

    def _list_ours(self, deployment: str, pid: str | None) -> list[Any]:
        md = {META_DEPLOYMENT: deployment}
        if pid is not None:
            md[META_PID] = pid
        out = []
        for s in self.conn.compute.servers(details=True, tags=self.server_tags(md)[-1]):
            md = s.metadata or {}
            if (s.status or "").upper() in ("DELETED", "SOFT_DELETED"):
                continue  # on its way out of Nova's listings
            if md.get(META_DEPLOYMENT) != deployment:
                continue
            if pid is not None and md.get(META_PID) != pid:
                continue
            out.append(s)
        out.sort(key=lambda s: (s.created_at or "", s.id))
        return out

    async def find_by_metadata(self, deployment: str | None = None, pid: int | str | None = None) -> list[OSServer]:
        """Servers whose metadata says ``cloudfs-deployment == deployment``
        (default: this driver's) and, if given, ``cloudfs-pid == pid``
        (found through their tags, see :meth:`server_tags`), not deleted,
        oldest first (Nova's ``created``, then id).  For adoption after a lost
        reply or a daemon restart, and for finding orphans."""
        dep = deployment or self.bound()
        servers = await self._call(f"list servers of {dep}", self._list_ours, dep,
                                   None if pid is None else str(pid))
        return [self._server(s) for s in servers]

    async def find(self, pid: int) -> list[OSServer]:
        """The servers of this deployment tagged with ``pid`` (any status but
        deleted, oldest first), from one tag-filtered listing; no side effects."""
        return await self.find_by_metadata(self.bound(), pid)

    async def boot(self, spec: ServerSpec, *, dedupe: bool = True) -> OSServer:
        """Ask Nova for ``spec``'s server and return at once (usually
        ``creating``), adopting a live server of this deployment tagged with
        ``spec.pid`` instead (failed or deleting ones are deleted).
        ``image``, ``flavor`` and ``networks`` are names or ids; ``flavor``
        ``""`` is the default flavor, ``networks`` empty the default network.
        NotFound for unknown ones; DriverError for user data over Nova's 64
        KiB or a refusal (quota, …)."""
        md = self.metadata_for(spec)
        pid = md[META_PID]
        if await self._any_tagged(md):
            for s in await self.find_by_metadata(md[META_DEPLOYMENT], pid):
                if _live(s):
                    log.info("adopting server %s for pid %s", s.id, pid)
                    return s
                await self._delete(s.id, wait=False)  # ERROR / being deleted: not worth adopting
        ud = base64.b64encode(bytes(spec.userdata)).decode("ascii")
        if len(ud) > MAX_USERDATA_B64:
            raise DriverError(f"openstack: user data is {len(spec.userdata)} bytes; "
                              "Nova takes at most 48 KiB (64 KiB base64)")
        image_id = await self._lookup("image", spec.image, self._load_images)
        flavor_id = await self._lookup("flavor", spec.flavor or "", self._load_flavors)
        net_ids = [await self._lookup("network", n, self._load_networks) for n in spec.networks or ("",)]
        metadata = dict(md)
        if spec.secret:
            metadata[META_SECRET] = spec.secret
        attrs = dict(name=spec.name, image_id=image_id, flavor_id=flavor_id,
                     networks=[{"uuid": n} for n in net_ids], user_data=ud, metadata=metadata,
                     tags=self.server_tags(md))
        s = await self._call(f"create server {spec.name!r}", self.conn.compute.create_server, **attrs)
        server = self._server(s)
        if dedupe:
            server = await self._dedupe(md[META_DEPLOYMENT], pid, server)
        return server

    async def _any_tagged(self, md: Mapping[str, str]) -> bool:
        """Whether Nova lists any server with the pid tag of ``md`` (ids
        only: the cheap first look before a create)."""
        tag = self.server_tags(md)[-1]
        return await self._call(f"list servers tagged {tag}", lambda: any(
            True for _ in self.conn.compute.servers(details=False, tags=tag)))

    async def _dedupe(self, deployment: str, pid: str, mine: OSServer) -> OSServer:
        """Keep the oldest live server of (deployment, pid), delete the rest:
        two creates for one pid (a retry after a lost reply racing the first)
        converge on one server whichever of them looks."""
        md = {META_DEPLOYMENT: deployment, META_PID: pid}
        tag = self.server_tags(md)[-1]
        ids = await self._call(f"list servers of {deployment} pid {pid}", lambda: [
            x.id for x in self.conn.compute.servers(details=False, tags=tag)])
        if set(ids) <= {mine.id}:
            return mine  # the usual case: one cheap call, no details
        live = [s for s in await self.find_by_metadata(deployment, pid) if _live(s)]
        if not live or all(s.id == mine.id for s in live):
            return mine
        keep = live[0]
        for s in live[1:]:
            log.warning("deleting duplicate server %s of pid %s (keeping %s)", s.id, pid, keep.id)
            await self._delete(s.id, wait=False)
        return keep

    async def _wait_deduping(self, s: OSServer, pid: int) -> OSServer:
        """Wait for ``s`` to be up, then check for duplicates of its pid: by
        then a racing create's server is visible (it is older) or will see
        ours (older) in its own check, so both keep the same, oldest one."""
        got = await self.wait(s.id, ("running", "stopped"), ports=False)
        # the duplicate check and the port lookup at once (one round trip)
        results: dict[str, Any] = {}

        async def run(key: str, fn: Callable[[], Any]) -> None:
            try:
                results[key] = await fn()
            except DriverError as e:
                results[key + "!"] = e

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "keep", lambda: self._dedupe(self.bound(), str(pid), got))
            nursery.start_soon(run, "ports", lambda: self._with_ports(got))
        for key in ("keep!", "ports!"):
            if key in results:
                raise results[key]
        if results["keep"].id == got.id:
            return results["ports"]
        return await self.wait(results["keep"].id, ("running", "stopped"))

    async def create(self, spec: ServerSpec) -> OSServer:
        """Find or boot ``spec``'s server (see :meth:`boot`) and wait for
        ``ACTIVE`` (or ``SHUTOFF`` for an adopted one); returns it with its
        addresses.  If Nova ends the boot in ``ERROR`` the server is deleted
        and DriverError carries Nova's fault message (e.g. NoValidHost's "No
        valid host was found. …").  A server left otherwise (a deadline, a
        failing port lookup) is kept: the next create adopts it, and a kill
        of the process finds and deletes it."""
        s = await self.boot(spec, dedupe=False)
        try:
            for _ in range(3):
                try:
                    return await self._wait_deduping(s, spec.pid)
                except NotFound:
                    # deleted as a duplicate by a racing create of the same
                    # pid (see _dedupe): adopt the one that was kept
                    s = await self.boot(spec)
            raise DriverError(f"openstack: server {s.id} vanished while booting")
        except DriverError:
            with trio.CancelScope(shield=True):
                try:
                    if (await self._get(s.id)).status == "error":
                        await self._delete(s.id, wait=False)
                except NotFound:
                    pass
                except DriverError as e:
                    log.warning("could not look at or delete failed server %s: %s", s.id, e)
            raise

    async def rebuild(self, server_id: str, image: str, userdata: bytes, *, secret: str = "") -> OSServer:
        """Nova rebuild from ``image`` with new user data, keeping id and
        addresses; waits for ``ACTIVE``.  NotFound for an unknown server or
        image; DriverError with the fault message if it ends in ERROR."""
        await self._get(server_id)  # NotFound unless it is this deployment's
        image_id = await self._lookup("image", image, self._load_images)
        ud = base64.b64encode(bytes(userdata)).decode("ascii")
        if len(ud) > MAX_USERDATA_B64:
            raise DriverError(f"openstack: user data is {len(userdata)} bytes; Nova takes at most 48 KiB (64 KiB base64)")
        if secret:  # the guest reads it from the metadata service after the rebuild
            await self._call(f"metadata of {server_id}", self.conn.compute.set_server_metadata, server_id,
                             **{META_SECRET: secret})
        await self._call(f"rebuild server {server_id}", self.conn.compute.rebuild_server,
                         server_id, image_id, user_data=ud)
        return await self.wait(server_id, ("running",))

    async def delete(self, server_id: str, *, wait: bool = True) -> None:
        """Delete the server and (``wait``) poll until Nova no longer has it;
        no error if it is already gone; NotFound (and nothing deleted) if
        it is another deployment's."""
        try:
            await self._get(server_id)
        except NotOurs:
            raise
        except NotFound:
            return
        await self._delete(server_id, wait=wait)

    async def _delete(self, server_id: str, *, wait: bool = True) -> None:
        """Delete a server known to be this deployment's (see :meth:`delete`)."""
        try:
            await self._call(f"delete server {server_id}", self.conn.compute.delete_server, server_id)
        except NotFound:
            return
        if not wait:
            return

        def done(s: OSServer | None) -> bool:
            if s is None:
                return True
            if s.status == "error" and s.task_state is None:  # a failed delete: Nova says why
                raise DriverError(f"openstack: delete of {server_id} failed: {s.message}")
            return False

        await self._watch(server_id, done, self.boot_timeout, "deleted")

    async def _power(self, server_id: str, want: str, action: str, fn: Callable[[str], None]) -> OSServer:
        s = await self._get(server_id)
        if s.task_state is not None:
            s = await self.wait(server_id, ("running", "stopped", "error"))
        if s.status == want:
            return await self._get(server_id, ports=True)
        if s.status == "error":
            raise DriverError(f"openstack: cannot {action} server {server_id} in ERROR: {s.message}")
        try:
            await self._call(f"{action} server {server_id}", fn, server_id)
        except NotFound:
            raise
        except DriverError:
            # 409 when another daemon acted first; the state decides
            s = await self._get(server_id)
            if s.status != want and s.task_state is None:
                raise
        return await self.wait(server_id, (want,))

    async def stop(self, server_id: str) -> OSServer:
        """Nova os-stop and wait for SHUTOFF; a stopped server is left as is."""
        return await self._power(server_id, "stopped", "stop", self.conn.compute.stop_server)

    async def start(self, server_id: str) -> OSServer:
        """Nova os-start and wait for ACTIVE; a running server is left as is."""
        return await self._power(server_id, "running", "start", self.conn.compute.start_server)

    async def migrate(self, server_id: str, host: str) -> OSServer:
        """Live-migrate a running server to nova-compute host ``host`` (Nova
        ``POST /servers/{id}/action`` ``os-migrateLive`` at microversion
        2.30, openstacksdk's ``live_migrate_server``: ``host`` named but not
        forced, so the scheduler still checks it, ``block_migration:
        auto``) and wait until Nova has it ACTIVE with no task again
        (``boot_timeout``).  ``host`` is a compute service's host name as
        ``os-services`` lists it (``openstack compute service list``).
        Returns the server with ``host`` the new one (Nova's
        ``OS-EXT-SRV-ATTR:host``, as :meth:`status` and :meth:`find` show
        it) and its addresses, which a live migration keeps (its ports are
        bound to the new host).  Nova's default policy lets admins only.

        Errors (DriverError): EINVAL when ``host`` is not a nova-compute
        host of the cloud or is the one the server is on (Nova would say
        "No valid host" for that); EBUSY when the server is not ACTIVE
        (SHUTOFF, ERROR, building …), has a task under way (moving,
        rebooting …) or Nova answers 409; EIO when Nova refuses the move
        (its pre-checks, HTTP 400: the host has no room, is down or
        disabled, a port cannot be bound there) or the migration fails
        later (Nova's migration status ``error``/``failed``, given in the
        message) — the server then runs where it was — or the server ends
        in ERROR (Nova's fault message); EAGAIN (:class:`DriverTimeout`)
        when a call outlives ``timeout`` or the move ``boot_timeout`` (it
        may still finish: :meth:`status` tells).  NotFound if Nova has no
        such server, NotOurs if it is another deployment's (then nothing
        is asked of Nova).  Two daemons moving one server at once: one
        moves it, the other gets EBUSY while it moves, or the server if
        that move brought it to ``host`` before the refusal was looked at."""
        s = await self._get(server_id)
        if s.task_state is not None or s.nova_status != "ACTIVE":
            doing = (f"busy ({s.nova_status}, task {s.task_state})" if s.task_state
                     else f"not running ({s.nova_status})")
            raise DriverError(f"openstack: server {server_id} cannot move now: it is {doing}", errno=errno.EBUSY)
        if not host:
            raise DriverError("openstack: migrate needs a compute host", errno=errno.EINVAL)
        if host == s.host:
            raise DriverError(f"openstack: server {server_id} already runs on {host}", errno=errno.EINVAL)
        known = await self._call(f"compute host {host!r}", self._compute_hosts, host)
        if known is not None and host not in known:
            raise DriverError(f"openstack: no compute host {host!r}", errno=errno.EINVAL)
        what = f"live-migrate server {server_id} to {host}"
        try:
            await self._call(what, self._live_migrate, server_id, host, what)
        except (NotFound, DriverTimeout):
            raise
        except DriverError as e:
            if e.errno != errno.EIO:
                raise
            # a refusal; when a task began since our look (another daemon's
            # move: Nova then answers 500, "Conflict updating instance") the
            # state decides: busy while it moves, done if it is there now
            now = await self._get(server_id)
            if now.task_state is not None:
                raise DriverError(f"openstack: server {server_id} cannot move now: it is busy "
                                  f"({now.nova_status}, task {now.task_state})", errno=errno.EBUSY) from e
            if now.host == host and now.nova_status == "ACTIVE":
                return await self._with_ports(now)
            raise
        srv = await self.wait(server_id, ("running", "stopped"), ports=False, expired=DriverTimeout)
        if srv.host == host:
            return await self._with_ports(srv)
        status = await self._migration_status(server_id)
        raise DriverError(f"openstack: live migration of server {server_id} to {host} failed "
                          f"(Nova's migration status: {status}); it runs on {srv.host}")

    def _compute_hosts(self, host: str) -> list[str] | None:
        """The hosts of nova-compute services named ``host`` (``[]``: none);
        None when Nova does not show services to us (not an admin)."""
        import openstack.exceptions as osx

        try:
            return [sv.host for sv in self.conn.compute.services(binary="nova-compute", host=host)]
        except osx.ForbiddenException:
            return None

    def _live_migrate(self, server_id: str, host: str, what: str) -> None:
        """``os-migrateLive``; Nova's 400 (a pre-check refused the move) is
        EIO, its 409 (the server's state forbids it) EBUSY."""
        import openstack.exceptions as osx

        try:
            self.conn.compute.live_migrate_server(server_id, host=host, block_migration="auto")
        except osx.BadRequestException as e:
            raise DriverError(f"openstack: {what}: refused: {_message(e)}") from e
        except osx.ConflictException as e:
            raise DriverError(f"openstack: {what}: {_message(e)}", errno=errno.EBUSY) from e

    async def _migration_status(self, server_id: str, settle: float = 5.0) -> str:
        """Nova's status of the server's newest live migration (``GET
        /os-migrations``, admin), waiting up to ``settle`` seconds for a
        final one (Nova sets it just after the server's task): ``error``,
        ``failed`` …; ``unknown`` when Nova shows none."""
        import openstack.exceptions as osx

        def newest() -> str:
            try:
                for m in self.conn.compute.migrations(server_id=server_id, migration_type="live-migration"):
                    return str(m.status or "unknown")  # newest first
            except osx.ForbiddenException:
                pass
            return "unknown"

        status = "unknown"
        with trio.move_on_after(settle):
            while True:
                try:
                    status = await self._call(f"migrations of {server_id}", newest)
                except DriverError as e:
                    log.warning("looking at the migrations of %s failed: %s", server_id, e)
                    break
                if status in ("error", "failed", "cancelled", "completed", "done", "unknown"):
                    break
                await trio.sleep(0.25)
        return status

    async def status(self, server_id: str) -> OSServer:
        """The server now (state per :data:`STATES`, fault message in
        ``error``, addresses from its ports); NotFound if Nova has none."""
        return await self._get(server_id, ports=True)

    async def stats(self, server_id: str) -> ServerStats:
        """Nova's server diagnostics (``GET /servers/{id}/diagnostics`` at
        microversion 2.48, the standardized form; admin-only by Nova's
        default policy), parsed here: openstacksdk's own parsing of it is
        wrong for 2.48.  CPU time (ns) summed over ``cpu_details``, memory
        from ``memory_details`` (MiB), disk and NIC counters summed, uptime;
        fields Nova leaves out or sends malformed are unknown, and all of
        them when Nova refuses (403: the credentials are not an admin's).
        NotFound if the server is gone (or another deployment's)."""
        await self._get(server_id)
        raw = await self._call(f"diagnostics of {server_id}", self._diagnostics, server_id)
        return _diagnostics_stats(raw)

    def _diagnostics(self, server_id: str) -> Any:
        import openstack.exceptions as osx

        resp = self.conn.compute.get(f"/servers/{server_id}/diagnostics", microversion="2.48")
        if resp.status_code == 403:  # not an admin (Nova's default policy): nothing is known
            return None
        osx.raise_from_response(resp)
        return resp.json()

    async def console(self, server_id: str, limit: int) -> bytes:
        """Nova's console output (``os-getConsoleOutput``), its last
        ``limit`` bytes.  NotFound if the server is gone."""
        await self._get(server_id)
        got = await self._call(f"console of {server_id}", self.conn.compute.get_server_console_output, server_id)
        text = got.get("output") if isinstance(got, dict) else None
        if not isinstance(text, str):
            return b""
        return text.encode("utf-8", "replace")[-limit:] if limit else b""

    async def userdata(self, server_id: str) -> bytes:
        """The user data Nova holds for the server (decoded; admin, ≥ 2.3)."""
        s = await self._call(f"get server {server_id}", self.conn.compute.get_server, server_id)
        return base64.b64decode(s.user_data) if s.user_data else b""

    # ------------------------------------------------------------ Glance, Neutron

    def _images(self) -> list[OSImage]:
        out = []
        for im in self.conn.image.images():
            out.append(OSImage(id=im.id, name=im.name or "", status=im.status or "", size=int(im.size or 0),
                               disk_format=im.disk_format or "", checksum=im.checksum or "",
                               created=im.created_at or "", container_format=im.container_format or ""))
        out.sort(key=lambda i: (i.name, i.created, i.id))
        return out

    async def list_images(self) -> list[OSImage]:
        """Glance images (all statuses), by name: id, name, status, size
        (bytes), disk and container format, checksum (MD5), created."""
        return await self._call("list images", self._images)

    def _sorted_flavors(self) -> list[Any]:
        fls = list(self.conn.compute.flavors(details=True))
        fls.sort(key=lambda f: (f.ram or 0, f.vcpus or 0, f.disk or 0, f.name))
        return fls

    def _flavors(self) -> list[str]:
        return [f.name for f in self._sorted_flavors()]

    async def list_flavors(self) -> list[str]:
        """Flavor names, smallest (RAM, vCPUs, disk) first: the default."""
        return await self._call("list flavors", self._flavors)

    def _networks(self) -> list[OSNetwork]:
        cidrs: dict[str, list[tuple[int, str, str]]] = {}
        for sn in self.conn.network.subnets():
            cidrs.setdefault(sn.network_id, []).append((sn.ip_version or 4, sn.cidr, sn.id))
        nets = []
        for n in self.conn.network.networks():
            subs = sorted(cidrs.get(n.id, []))
            v4 = [c for v, c, _ in subs if v == 4]
            nets.append(((not v4, not n.is_shared, n.created_at or "", n.name or "", n.id),
                         OSNetwork(id=n.id, name=n.name or "", cidr=v4[0] if v4 else "",
                                   status=(n.status or "").lower(), cidrs=tuple(c for _, c, _ in subs),
                                   subnets=tuple(i for _, _, i in subs))))
        # the default network first: with an IPv4 subnet, shared, oldest
        nets.sort(key=lambda x: x[0])
        return [n for _, n in nets]

    async def list_networks(self) -> list[OSNetwork]:
        """Neutron networks with their subnets' CIDRs.  The first is the
        default for processes that name none: networks with an IPv4 subnet
        first, shared ones first, then oldest first (so creating networks
        never changes the default)."""
        return await self._call("list networks", self._networks)

    def _create_network(self, name: str, cidr: str | None) -> OSNetwork:
        if any(True for _ in self.conn.network.networks(name=name)):
            raise DriverError(f"openstack: network {name!r} exists")
        if cidr is None:
            used = [ipaddress.ip_network(sn.cidr) for sn in self.conn.network.subnets() if sn.ip_version == 4]
            for i in range(1, 255):
                cand = ipaddress.ip_network(f"10.{i}.0.0/24")
                if not any(cand.overlaps(u) for u in used):
                    cidr = str(cand)
                    break
            else:
                raise DriverError("openstack: no free 10.x.0.0/24 for a new network")
        else:
            try:
                cidr = str(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                raise DriverError(f"openstack: bad cidr {cidr!r}") from None
        net = self.conn.network.create_network(name=name)
        try:
            sn = self.conn.network.create_subnet(network_id=net.id, name=name, cidr=cidr,
                                                 ip_version=ipaddress.ip_network(cidr).version)
        except Exception:
            self.conn.network.delete_network(net.id, ignore_missing=True)
            raise
        return OSNetwork(id=net.id, name=net.name or name, cidr=sn.cidr, status=(net.status or "").lower(),
                         cidrs=(sn.cidr,), subnets=(sn.id,))

    async def create_network(self, name: str, cidr: str | None = None) -> OSNetwork:
        """A Neutron network and one subnet (``cidr``; None: a free
        10.x.0.0/24).  DriverError if the name is taken or the CIDR is bad;
        the network is removed again if its subnet cannot be made."""
        net = await self._call(f"create network {name!r}", self._create_network, name, cidr)
        self._cache.pop("network", None)
        return net

    async def delete_network(self, name_or_id: str) -> None:
        """Delete a network (Neutron deletes its subnets and DHCP ports with
        it); no error if gone.  DriverError(EBUSY), and nothing deleted,
        while a server has a port on it."""
        def work() -> None:
            nets = [n for n in list(self.conn.network.networks(name=name_or_id))
                    or [self.conn.network.find_network(name_or_id)] if n is not None]
            for n in nets:
                busy = [p for p in self.conn.network.ports(network_id=n.id)
                        if (p.device_owner or "").startswith("compute:")]
                if busy:
                    raise DriverError(f"network {n.name!r} is in use by {len(busy)} server port(s)",
                                      errno=errno.EBUSY)
            import openstack.exceptions as osx

            for n in nets:
                try:
                    self.conn.network.delete_network(n.id, ignore_missing=True)
                except osx.ConflictException as e:  # a port made since the check (NetworkInUse)
                    raise DriverError(f"network {n.name!r} is in use: {_message(e)}", errno=errno.EBUSY) from e

        await self._call(f"delete network {name_or_id!r}", work)
        self._cache.pop("network", None)
