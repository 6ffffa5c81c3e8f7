"""``cloudfs up --driver openstack`` against the real control plane of
tests/openstack.py: the daemon chooses the cloud the standard way (OS_CLOUD,
clouds.yaml), /images and /net are Glance and Neutron, and a daemon killed
with SIGKILL mid-boot and started again leaves neither a duplicate nor an
orphan server.  The daemons are child processes on the session's ZooKeeper;
every server a test made is deleted at its end."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import openstack.exceptions
import pytest
import trio

from cloudfs.catalog import CATALOG_TTL, MISS_INTERVAL
from cloudfs.drivers.base import META_PID, META_ROOT
from mountd.zkserver import free_port
from ninep.client import open_client
from tests.openstack import openstack_cloud  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.openstack,
    # openstacksdk's notices about its own internals, not about this code
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:openstack"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:openstack"),
]


class OSDaemon:
    """A ``cloudfs up --driver openstack`` child process of one deployment."""

    def __init__(self, cloud, zk_hosts: str, deployment: str, tmp: Path, extra: tuple[str, ...] = ()):
        self.cloud, self.zk_hosts, self.deployment = cloud, zk_hosts, deployment
        self.extra = list(extra)
        self.state = tmp / "state"
        self.log = tmp / "daemon.log"
        self.operator = f"unix!{self.state / 'cloudfs.sock'}"
        self.proc: subprocess.Popen | None = None

    @property
    def root(self) -> str:
        return f"/cloudfs/{self.deployment}"

    def start(self) -> "OSDaemon":
        env = dict(os.environ, **self.cloud.env())
        with open(self.log, "ab") as log:
            log.write(b"--- start\n")
        mark = self.log.stat().st_size
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mountd.cli", "up", "--driver", "openstack", "--zookeeper", self.zk_hosts,
                 "--deployment", self.deployment, "--state-dir", str(self.state),
                 "--listen", f"tcp!127.0.0.1!{free_port()}", *self.extra],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while b"cloudfs up: 9P on" not in self.log.read_bytes()[mark:]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"daemon did not come up:\n{self.log.read_text()}")
            time.sleep(0.1)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)


def servers_of(conn, root: str, pid: int | None = None) -> list:
    """The live Nova servers of the deployments on ZooKeeper root ``root``
    (of ``pid`` if given)."""
    out = []
    for s in conn.compute.servers(details=True):
        md = s.metadata or {}
        if md.get(META_ROOT) == root and (pid is None or md.get(META_PID) == str(pid)):
            if s.status != "DELETED":
                out.append(s)
    return out


@pytest.fixture
def conn(openstack_cloud):  # noqa: F811
    return openstack_cloud.connect()


@pytest.fixture
def daemon(openstack_cloud, zookeeper, conn, tmp_path):  # noqa: F811
    d = OSDaemon(openstack_cloud, zookeeper.hosts, f"os-{uuid.uuid4().hex[:8]}", tmp_path)
    try:
        yield d
    finally:
        d.kill(signal.SIGTERM)
        for s in servers_of(conn, d.root):
            conn.compute.delete_server(s.id, ignore_missing=True)


async def _ctl(c, pid: int, cmd: str) -> str:
    async with await c.walk(f"proc/{pid}/ctl") as f:
        await f.open(os.O_RDWR)
        await f.write(0, cmd.encode() + b"\n")
        return (await f.read(0, 4096)).decode()


async def _status(c, pid: int) -> dict[str, str]:
    text = (await c.read_file(f"proc/{pid}/status")).decode()
    return dict(line.split(" ", 1) for line in text.splitlines())


async def _until(check, timeout: float, what: str):
    with trio.move_on_after(timeout):
        while True:
            v = await check()
            if v:
                return v
            await trio.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout}s")


def test_images_and_a_network_made_through_net(daemon, conn):
    daemon.start()
    name = f"lab{uuid.uuid4().hex[:6]}"

    async def session():
        async with open_client(daemon.operator) as c:
            images = await c.listdir("images")
            tiny = (await c.read_file("images/tiny")).decode()
            root = await c.root()
            async with await root.walk("net") as net:  # touch /net/<name>: the create operation
                f = await net.create(name, os.O_RDONLY, 0o644)
                await f.clunk()
            return images, tiny, (await c.read_file(f"net/{name}")).decode()

    images, tiny, netfile = trio.run(session)
    try:
        glance = conn.image.find_image("tiny")
        assert "tiny" in images
        assert f"id {glance.id}\n" in tiny and f"container_format {glance.container_format}\n" in tiny
        network = conn.network.find_network(name)
        assert network is not None
        cidrs = [conn.network.get_subnet(s).cidr for s in network.subnet_ids]
        assert cidrs and f"cidr {cidrs[0]}\n" in netfile and f"id {network.id}\n" in netfile
    finally:
        network = conn.network.find_network(name)
        if network is not None:
            for s in network.subnet_ids:
                conn.network.delete_subnet(s, ignore_missing=True)
            conn.network.delete_network(network, ignore_missing=True)


def test_kill_9_mid_boot_then_restart_leaves_one_server(daemon, conn):
    daemon.start()

    async def begin() -> int:
        async with open_client(daemon.operator) as c:
            pid = int(await _ctl(c, 1, "fork name=web"))
            await c.write_file(f"proc/{pid}/userdata", b"#cloud-config\n")
            await _ctl(c, pid, "exec tiny")
            return pid

    pid = trio.run(begin)
    time.sleep(0.5)  # the create is on its way to Nova
    daemon.kill(signal.SIGKILL)
    daemon.start()  # a new daemon: it takes over once the dead one's session has expired

    async def settle():
        async with open_client(daemon.operator) as c:
            await _until(lambda: _running(c, pid), 120, f"process {pid} running after the restart")
            return await _status(c, pid)

    async def _running(c, pid):
        st = await _status(c, pid)
        return st["state"] == "running"

    st = trio.run(settle)
    live = servers_of(conn, daemon.root)
    assert [s.metadata[META_PID] for s in live] == [str(pid)], live  # one server: no duplicate, no orphan
    assert live[0].status == "ACTIVE" and st["addresses"] != "-"

    async def kill():
        async with open_client(daemon.operator) as c:
            await _ctl(c, pid, "kill")
            await _until(lambda: _gone(c, pid), 120, f"process {pid} gone")

    async def _gone(c, pid):
        return str(pid) not in await c.listdir("proc")

    trio.run(kill)
    assert servers_of(conn, daemon.root) == []


def test_glance_and_neutron_down_images_fail_proc_goes_on(daemon, openstack_cloud):  # noqa: F811
    """The Image and Networking APIs stop: `ls /images` and `ls /net` fail
    with EIO whose 9P2000.u message is the cloud's error (logged by the
    daemon in one line, no traceback, no "internal error"), while /proc
    keeps working; once they are back, so is /images."""
    from ninep.errors import FsError

    daemon.start()

    async def listing(path: str, version: str = "9P2000.u"):
        async with open_client(daemon.operator, version=version) as c:
            return await c.listdir(path)

    assert "tiny" in trio.run(listing, "images")  # the daemon's connection knows Glance
    mark = daemon.log.stat().st_size
    with openstack_cloud.outage("glance", "neutron"):
        time.sleep(CATALOG_TTL)  # what the daemon listed before is stale now

        async def during():
            errors = {}
            for path in ("images", "net"):
                with pytest.raises(FsError) as e:
                    await listing(path)
                errors[path] = e.value
            with pytest.raises(FsError) as e:
                await listing("images", "9P2000.L")
            assert e.value.errno == errno.EIO
            async with open_client(daemon.operator) as c:  # the rest of the tree goes on
                pid = int(await _ctl(c, 1, "fork name=meanwhile"))
                assert str(pid) in await c.listdir("proc")
                assert (await _status(c, pid))["state"] == "new"
            return errors

        errors = trio.run(during)
    for path, what in (("images", "list images"), ("net", "list networks")):
        e = errors[path]
        assert e.errno == errno.EIO, e
        assert f"openstack: {what}: cannot reach the cloud" in e.message and "refused" in e.message, e.message
    log = daemon.log.read_bytes()[mark:].decode(errors="replace")
    assert "Traceback" not in log and "internal error" not in log, log
    said = [line for line in log.splitlines() if "compute driver: list images" in line]
    assert 1 <= len(said) <= 2 and "cannot reach the cloud" in said[0], log
    time.sleep(MISS_INTERVAL)
    assert "tiny" in trio.run(listing, "images")


def test_files_on_swift_shared_by_two_daemons(openstack_cloud, zookeeper, conn, tmp_path):  # noqa: F811
    """``cloudfs up --files swift`` on two daemons of one deployment (two
    state dirs, as two hosts): a file written and closed through one is read
    whole through the other (close-to-open), and it is an object of the
    deployment's container, under its pseudo-folder."""
    deployment = f"files-{uuid.uuid4().hex[:8]}"
    args = ("--files", "swift", "--files-container", f"cloudfs-{deployment}")
    a = OSDaemon(openstack_cloud, zookeeper.hosts, deployment, tmp_path / "a", args)
    b = OSDaemon(openstack_cloud, zookeeper.hosts, deployment, tmp_path / "b",
                 (*args, "--zookeeper-auth", str(a.state / "zookeeper.auth")))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    data = os.urandom(5 << 20)

    async def write_then_read() -> bytes:
        async with open_client(a.operator) as ca, open_client(b.operator) as cb:
            await ca.mkdir("files/output")
            await ca.write_file("files/output/result.bin", data)
            return await cb.read_file("files/output/result.bin")

    try:
        a.start()
        b.start()
        assert trio.run(write_then_read) == data
        names = [o.name for o in conn.object_store.objects(f"cloudfs-{deployment}")]
        assert names == ["output/", "output/result.bin"], names
    finally:
        a.kill()
        b.kill()
        drop_container(conn, f"cloudfs-{deployment}")


def drop_container(conn, name: str) -> None:
    """Delete container ``name`` and its objects (best effort: a test's
    own failure is what it should report)."""
    for _ in range(10):
        try:
            for o in list(conn.object_store.objects(name)):
                conn.object_store.delete_object(o, container=name, ignore_missing=True)
            conn.object_store.delete_container(name, ignore_missing=True)
            return
        except openstack.exceptions.NotFoundException:
            return
        except openstack.exceptions.ConflictException:
            time.sleep(0.5)  # the container's count lags the deletes a little
