"""The cloudfs daemon (``cloudfs up``): one namespace, served over FUSE and 9P.

:func:`run` does, in the foreground:

1. ZooKeeper: connect to ``--zookeeper`` hosts, or start an embedded server
   (Debian's package, data under ``STATE/zookeeper``) and stop it on exit;
2. the namespace: a :class:`cloudfs.namespace.CloudFS` on the deployment's
   znode, with the reconciler of the chosen compute driver;
3. 9P: on every ``--listen`` dial string (default ``tcp!127.0.0.1!564``) the
   public face (:class:`cloudfs.identity.PublicFS`: a process's view for a
   valid pid/secret credential, else read-only; OpenStack guests come in
   here), on each QEMU VM's channel that process's view
   (cloudfs.channel), and on the operator's unix socket
   ``STATE/cloudfs.sock`` the operator's view with full rights (mode 0600:
   file permissions are its credential);
4. FUSE: the same tree mounted at ``--mount`` (a stale mount left by a crash is
   cleaned first).

SIGINT/SIGTERM: unmount, close 9P connections, stop the embedded ZooKeeper.
VMs are not children of the daemon: they outlive it and are re-adopted on
the next start.
"""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import secrets
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from cloudfs.channel import Channels
from cloudfs.drivers.base import ComputeDriver
from cloudfs.hosts import default_host_name
from cloudfs.namespace import open_cloudfs
from cloudfs.quotas import DEFAULT_MAX_PROCESSES
from ninep.dial import listener_address, open_listeners, parse_dial
from ninep.limits import Limits
from ninep.server import Server

from . import zkserver

log = logging.getLogger("cloudfs.daemon")

DEFAULT_LISTEN = "tcp!127.0.0.1!564"
DEFAULT_STATE_DIR = Path("/var/lib/cloudfs")


async def _fake_driver(opts: "DaemonOptions", ninep_port: int | None) -> ComputeDriver:
    if opts.fake_cloud is not None:
        from cloudfs.drivers.fakecloud import FakeCloudDriver

        return FakeCloudDriver(opts.fake_cloud)
    from cloudfs.drivers.fake import FakeDriver

    return FakeDriver()


async def _qemu_driver(opts: "DaemonOptions", _ninep_port: int | None) -> ComputeDriver:
    from cloudfs.drivers.qemu import QemuDriver

    # guests come in over their own channels (served below), not the listeners
    # the host its VMs are reported on is the daemon's name in /hosts, which migrate names
    return QemuDriver(opts.state_dir, qemu_user=opts.qemu_user, snapshot_boot=opts.boot == "snapshot",
                      host=opts.host or default_host_name())


async def _openstack_driver(opts: "DaemonOptions", ninep_port: int | None) -> ComputeDriver:
    from cloudfs.drivers.openstack import OpenStackDriver

    # reads clouds.yaml / OS_* (files only): off the event loop
    return await trio.to_thread.run_sync(partial(OpenStackDriver.from_cloud, opts.os_cloud))


#: Compute drivers by ``--driver`` name: an async function of the options and
#: the daemon's loopback 9P port (where local guests attach) giving a driver.
#: They raise ValueError or cloudfs.drivers.base.DriverError when unusable.
DRIVERS: dict[str, Callable[["DaemonOptions", int | None], Awaitable[ComputeDriver]]] = {
    "qemu": _qemu_driver,
    "fake": _fake_driver,
    "openstack": _openstack_driver,
}


@dataclass
class DaemonOptions:
    """What ``cloudfs up`` was asked to do (see ``cloudfs up --help``)."""

    mount: Path | None = None
    listen: list[str] = field(default_factory=lambda: [DEFAULT_LISTEN])
    zookeeper: str | None = None
    #: file holding the ZooKeeper digest credential ``user:password`` (made,
    #: mode 0600, at STATE/zookeeper.auth when not given and missing)
    zookeeper_auth: Path | None = None
    #: take over a deployment tree that exists without the credential's ACL
    adopt_open_tree: bool = False
    driver: str = "qemu"
    os_cloud: str | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    deployment: str = "default"
    debug_9p: bool = False
    debug_fuse: bool = False
    #: seconds the kernel may cache FUSE entries and attributes (tree changes
    #: from other hosts show after at most this long; 0: always ask)
    attr_timeout: float = 1.0
    #: quota limits new processes get (cloudfs.quotas; defaults for the rest)
    limits: dict[str, int] = field(default_factory=dict)
    #: init's descendants limit when the deployment's tree is made
    max_processes: int = DEFAULT_MAX_PROCESSES
    #: the user QEMU drops to (-runas) when the daemon runs as root (None: root)
    qemu_user: str | None = "nobody"
    #: qemu driver: "snapshot" (new VMs restored from a boot template of
    #: their image when there is one) or "cold" (always booted)
    boot: str = "snapshot"
    #: qemu driver: where this daemon takes VMs moved to it (``migrate``;
    #: a tcp dial string other hosts reach; "": it takes none)
    migrate_listen: str = ""
    #: the backend of /files: "local" (STATE/files) or "swift" (the cloud's
    #: object store, container ``files_container``)
    files: str = "local"
    files_container: str | None = None
    #: the deployment's /files limits (cloudfs.sharedfiles; defaults for the rest)
    files_limits: dict[str, int] = field(default_factory=dict)
    #: fake driver: the directory of a fake cloud shared with other daemons
    #: (cloudfs.drivers.fakecloud); None: servers in this daemon's memory
    fake_cloud: Path | None = None
    #: this daemon's name in /hosts (cloudfs.hosts; None: the machine's hostname)
    host: str | None = None
    #: ZooKeeper session timeout (s): how long the ensemble keeps this
    #: daemon's session, and so its owner znodes, while it cannot be reached
    session_timeout: float = 10.0

    @property
    def operator_socket(self) -> Path:
        return self.state_dir / "cloudfs.sock"

    @property
    def zk_root(self) -> str:
        """The deployment's znode (its unique id is kept there, cloudfs.deployment)."""
        return f"/cloudfs/{self.deployment}"


async def files_backend(opts: DaemonOptions):
    """The /files backend ``opts.files`` names: a LocalStore in STATE/files,
    or a SwiftStore on the cloud of ``--os-cloud`` (container
    ``files_container``, default ``cloudfs-<deployment>``; writes spooled in
    STATE/files-spool).  ValueError for an unknown name or a cloud that is
    not configured (the store is first reached on first use: its errors are
    then EIO)."""
    if opts.files == "local":
        from cloudfs.filestore import LocalStore

        return LocalStore(opts.state_dir / "files")
    if opts.files == "swift":
        from cloudfs.swiftstore import SwiftStore

        container = opts.files_container or f"cloudfs-{opts.deployment}"

        def connect():
            import openstack.exceptions  # in the thread: importing openstacksdk takes a while

            try:
                return SwiftStore.from_cloud(opts.os_cloud, container, opts.state_dir / "files-spool")
            except openstack.exceptions.SDKException as e:
                raise ValueError(f"--files swift: {e}") from None

        return await trio.to_thread.run_sync(connect)
    raise ValueError(f"unknown files backend {opts.files!r} (known: local, swift)")


async def run(opts: DaemonOptions, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the daemon until SIGINT/SIGTERM (or cancellation).

    ``task_status.started()`` gets a dict with ``listen`` (bound dial
    strings), ``mount``, ``zookeeper`` (hosts) and ``fs`` (the CloudFS, for
    embedding and tests) once everything serves.
    Raises ValueError for an unknown driver or bad dial string, RuntimeError
    when ZooKeeper cannot be started, OSError when an address cannot be bound,
    DriverError when the compute driver cannot be set up (e.g. no usable cloud
    configuration).
    """
    if opts.driver not in DRIVERS:
        raise ValueError(f"unknown driver {opts.driver!r} (known: {', '.join(sorted(DRIVERS))})")
    if not opts.state_dir.exists():
        opts.state_dir.mkdir(mode=0o700, parents=True)  # ZooKeeper's data, VM identities, consoles: ours only
    elif opts.state_dir.stat().st_mode & 0o077:
        log.warning("state dir %s is open to other users; what holds secrets in it is not (0700/0600)",
                    opts.state_dir)
    lock = _lock_state_dir(opts.state_dir)  # one daemon per state dir
    zk = None
    socket_bound = False
    hosts = opts.zookeeper
    try:
        if hosts is None:
            zk = zkserver.embedded(opts.state_dir)
            log.info("starting embedded ZooKeeper on %s (data in %s)", zk.hosts, zk.dir)
            zk.launch()  # from this (the main) thread: the server dies with the daemon
            hosts = zk.hosts
            await trio.to_thread.run_sync(zk.wait_ready)
        # Bind first: a driver whose guests attach over 9P needs the port.
        listeners = []
        for dial in opts.listen:
            listeners += await open_listeners(dial)
        public = [listener_address(l) for l in listeners]
        driver = await DRIVERS[opts.driver](opts, _loopback_port(public))
        auth = zookeeper_credential(opts.zookeeper_auth or opts.state_dir / "zookeeper.auth",
                                    make=opts.zookeeper_auth is None)
        files = await files_backend(opts)
        async with open_cloudfs(hosts, driver, root=opts.zk_root, limits=opts.limits, zk_auth=auth,
                                files=files, files_limits=opts.files_limits,
                                adopt_open=opts.adopt_open_tree,
                                max_processes=opts.max_processes, session_timeout=opts.session_timeout,
                                host=opts.host or default_host_name(), migrate_listen=opts.migrate_listen) as fs:
            if hasattr(driver, "channel_handler"):  # VMs with a channel each (the QEMU driver)
                driver.channel_handler = Channels(fs, trace=opts.debug_9p).serve
            async with trio.open_nursery() as nursery:
                nofile = raise_nofile()
                pub_limits, op_limits = public_limits(nofile), OPERATOR_LIMITS
                log.info("9P limits: public face %d connections (%d per peer), %d requests outstanding each; "
                         "%d descriptors", pub_limits.max_connections, pub_limits.max_connections_per_peer,
                         pub_limits.max_outstanding, nofile)
                await nursery.start(partial(Server(fs.public(), msize=PUBLIC_MSIZE, trace=opts.debug_9p,
                                                   limits=pub_limits).serve_listeners, listeners))
                bound = public + await nursery.start(Server(fs, trace=opts.debug_9p, limits=op_limits).serve,
                                                     f"unix!{opts.operator_socket}")
                socket_bound = True
                if opts.mount is not None:
                    from .fuse import clean_stale_mount, mount

                    await clean_stale_mount(str(opts.mount))
                    opts.mount.mkdir(parents=True, exist_ok=True)
                    await nursery.start(partial(mount, fs, str(opts.mount), fsname=f"cloudfs:{opts.deployment}",
                                                debug=opts.debug_fuse, timeout=opts.attr_timeout,
                                                owner=(os.geteuid(), os.getegid())))
                info = {"listen": bound, "mount": str(opts.mount) if opts.mount else None, "zookeeper": hosts,
                        "fs": fs}
                log.info("cloudfs up: 9P on %s%s; ZooKeeper %s; driver %s; deployment %s (id %s); daemon %s "
                         "(owner znodes), host %s", ", ".join(bound), f"; mounted at {opts.mount}" if opts.mount else "",
                         hosts, opts.driver, opts.zk_root, fs.deployment_id, fs.daemon_id, fs.hosts.me.name)
                task_status.started(info)
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        log.info("got %s, shutting down", signal.Signals(signum).name)
                        break
                nursery.cancel_scope.cancel()
    finally:
        if zk is not None:
            log.info("stopping embedded ZooKeeper")
            zk.stop()
        if socket_bound:
            try:
                os.unlink(opts.operator_socket)
            except OSError:
                pass
        os.close(lock)


#: The largest msize the public face offers (guests mount with 64 KiB + 24):
#: a client's reply budget and pipelined writes are counted in msizes.
PUBLIC_MSIZE = 128 * 1024 + 24
#: Descriptors kept for everything but 9P connections: ZooKeeper, QMP and
#: driver calls, VM files, the FUSE device, logs.
FD_RESERVE = 256
#: The operator socket's 9P limits: one trusted user, few connections, many
#: blocked reads (``cat`` of env keys and wait in parallel).
OPERATOR_LIMITS = Limits(max_outstanding=1024, max_queued_msizes=32, max_connections=64)


def public_limits(nofile: int) -> Limits:
    """The 9P limits of the public face (guests and anonymous clients, see
    ninep.limits): 256 requests outstanding per connection (each blocked env
    or wait read reserves 8 KiB of the reply budget of 32 msizes, so they
    never starve other reads); connections at most ``nofile`` less
    FD_RESERVE (so 9P alone never runs the daemon out of descriptors), at
    most 1024, and 256 per peer address (QEMU guests come over their own
    channels, cloudfs.channel, not here)."""
    return Limits(max_outstanding=256, max_queued_msizes=32,
                  max_connections=max(16, min(1024, nofile - FD_RESERVE)), max_connections_per_peer=256)


def zookeeper_credential(path: Path, make: bool) -> str:
    """The ZooKeeper digest credential ``user:password`` in ``path``; when
    ``make`` and the file is missing, a new one (``cloudfs:`` and 192 random
    bits) is written there, mode 0600.  Every daemon of a deployment needs
    the same (give the others ``--zookeeper-auth`` with a copy).
    ValueError if the file is readable by others or malformed; OSError if it
    cannot be read."""
    if make and not path.exists():
        # written whole, then linked into place: a crash never leaves an empty one
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"cloudfs:{secrets.token_hex(24)}\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another start made it first
        finally:
            tmp.unlink(missing_ok=True)
    if path.stat().st_mode & 0o077:
        raise ValueError(f"{path} must not be readable by others (chmod 600): it opens the deployment's ZooKeeper tree")
    text = path.read_text().strip()
    user, sep, password = text.partition(":")
    if not sep or not user or not password or any(c.isspace() for c in text):
        raise ValueError(f"{path} must hold one line 'user:password'")
    return text


def raise_nofile(want: int = 65536) -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard limit (at most
    ``want``); returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return int(soft if soft != resource.RLIM_INFINITY else want)


def _lock_state_dir(state_dir: Path) -> int:
    """Hold ``STATE/lock`` (flock) for the daemon's life; returns its fd.
    RuntimeError if another daemon holds it (it would share the embedded
    ZooKeeper's data and the operator socket)."""
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RuntimeError(f"another cloudfs up (pid {holder}) uses the state dir {state_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _loopback_port(dials: list[str]) -> int | None:
    """The port of the first TCP listener reachable on 127.0.0.1."""
    for d in dials:
        p = parse_dial(d)
        if p.net == "tcp" and p.host in ("127.0.0.1", "localhost", "*", "0.0.0.0"):
            return p.port
    return None
