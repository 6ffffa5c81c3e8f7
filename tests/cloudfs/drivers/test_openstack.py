"""OpenStackDriver against a real OpenStack control plane on 127.0.0.1
(tests/openstack.py: keystone, glance, placement, nova with its fake
hypervisor, neutron ML2, MariaDB, RabbitMQ).

Each test works in its own deployment (server metadata) and deletes what it
made, so tests never see each other's servers.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import time
import uuid

import pytest
import trio

from cloudfs.drivers.base import META_ROOT, DriverError, DriverTimeout, NotFound, NotOurs, ServerSpec
from cloudfs.drivers.openstack import META_DEPLOYMENT, META_PID, META_PPID, OpenStackDriver
from tests.openstack import openstack_cloud  # noqa: F401

pytestmark = [
    pytest.mark.openstack,
    # openstacksdk's own deprecation notices about its internals, by the hundred
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:openstack"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:openstack"),
]


#: The control plane's two nova-compute hosts (scripts/openstack/controlplane.py
#: HOST, HOST2): boots land on the first, the second is a migration target
#: that takes flavors of up to 300000 MiB.
HOST, HOST2 = "cloudfs-compute", "cloudfs-compute2"


@pytest.fixture
def conn(openstack_cloud):  # noqa: F811
    c = openstack_cloud.connect()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def deployment(conn):
    """A fresh deployment name; its servers are deleted after the test."""
    dep = f"test-{uuid.uuid4().hex[:10]}"
    try:
        yield dep
    finally:
        delete_servers(conn, dep)


def delete_servers(conn, dep: str, key: str = META_DEPLOYMENT) -> None:
    """Delete every server whose metadata ``key`` is ``dep`` (deployment
    ``dep``; with META_ROOT the deployments on ZooKeeper root ``dep``),
    also ones a cancelled (abandoned) API call creates a moment later."""
    quiet = 0
    while quiet < 2:
        left = [s for s in conn.compute.servers() if (s.metadata or {}).get(key) == dep]
        for s in left:
            conn.compute.delete_server(s.id, ignore_missing=True)
        for s in left:
            conn.compute.wait_for_delete(s, interval=0.5, wait=120)
        quiet = 0 if left else quiet + 1
        time.sleep(0.5)


@pytest.fixture
def drv(conn, deployment):
    return OpenStackDriver(conn, deployment=deployment, timeout=60, boot_timeout=120, poll_interval=0.3)


def md(drv: OpenStackDriver, pid: int, ppid: int = 1) -> dict[str, str]:
    return {META_DEPLOYMENT: drv.deployment, META_PID: str(pid), META_PPID: str(ppid)}


def spec(pid: int, ppid: int = 1, name: str | None = None, image: str = "tiny", flavor: str = "",
         networks: tuple[str, ...] = (), userdata: bytes = b"") -> ServerSpec:
    return ServerSpec(pid=pid, ppid=ppid, name=name or f"p{pid}", image=image, flavor=flavor, networks=networks,
                      userdata=userdata)


async def test_from_cloud_the_standard_way(openstack_cloud, monkeypatch):  # noqa: F811
    """OS_CLIENT_CONFIG_FILE + OS_CLOUD, or the cloud's name, as openstackclient."""
    for k, v in openstack_cloud.env().items():
        monkeypatch.setenv(k, v)
    d = OpenStackDriver.from_cloud(None)
    assert (await d.list_flavors())[0] == "m1.tiny"
    d2 = OpenStackDriver.from_cloud("cloudfs")
    assert "tiny" in [i.name for i in await d2.list_images()]
    with pytest.raises(DriverError):
        OpenStackDriver.from_cloud("no-such-cloud")


async def test_images_are_glance_images(drv, conn):
    images = await drv.list_images()
    tiny = [i for i in images if i.name == "tiny"]
    assert len(tiny) == 1
    t = tiny[0]
    g = conn.image.get_image(t.id)
    assert (t.status, t.size, t.disk_format, t.container_format, t.checksum) == \
        ("active", g.size, "raw", "bare", g.checksum)
    assert t.size > 1 << 20 and re.fullmatch(r"[0-9a-f]{32}", t.checksum)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", t.created)


async def test_create_network_makes_network_and_subnet(drv, conn):
    name = f"net-{uuid.uuid4().hex[:8]}"
    auto = f"auto-{uuid.uuid4().hex[:8]}"
    try:
        net = await drv.create_network(name, "10.77.3.0/24")
        assert (net.name, net.cidr, net.status) == (name, "10.77.3.0/24", "active")
        n = conn.network.get_network(net.id)
        subnets = list(conn.network.subnets(network_id=net.id))
        assert n.name == name and [s.cidr for s in subnets] == ["10.77.3.0/24"]
        listed = {x.name: x for x in await drv.list_networks()}
        assert listed[name].cidr == "10.77.3.0/24" and listed["user"].cidr == "10.0.0.0/24"
        with pytest.raises(DriverError, match="exists"):
            await drv.create_network(name)
        with pytest.raises(DriverError, match="bad cidr"):
            await drv.create_network(f"bad-{uuid.uuid4().hex[:8]}", "10.300.0.0/24")
        a = await drv.create_network(auto)  # a free /24 picked by the driver
        used = [ipaddress.ip_network(s.cidr) for s in conn.network.subnets() if s.network_id != a.id]
        assert not any(ipaddress.ip_network(a.cidr).overlaps(u) for u in used)
    finally:
        await drv.delete_network(name)
        await drv.delete_network(auto)
    assert not list(conn.network.networks(name=name))


async def test_a_network_in_use_is_not_deleted(drv, conn):
    """rm /net/NAME on OpenStack: EBUSY (and nothing deleted) while a
    server has a port on the network; deleted with its subnet afterwards."""
    import errno

    name = f"busy-{uuid.uuid4().hex[:8]}"
    net = await drv.create_network(name, "10.79.0.0/24")
    s = None
    try:
        s = await drv.create(spec(41, 0, name="on-net", networks=(name,)))
        with pytest.raises(DriverError) as e:
            await drv.delete_network(name)
        assert e.value.errno == errno.EBUSY
        assert conn.network.find_network(name) is not None
        await drv.delete(s.id)
        s = None
        for _ in range(100):  # Neutron unbinds the server's port shortly after the delete
            if not [p for p in conn.network.ports(network_id=net.id) if (p.device_owner or "").startswith("compute:")]:
                break
            await trio.sleep(0.2)
        await drv.delete_network(name)
        assert conn.network.find_network(name) is None
        assert not list(conn.network.subnets(network_id=net.id))
    finally:
        if s is not None:
            await drv.delete(s.id)
        await drv.delete_network(name)


async def test_lifecycle_reaches_nova(drv, conn):
    """create → running with a port address; user data and metadata round
    trip; stop/start (idempotent); rebuild keeps id and address; delete."""
    ud = b"#cloud-config\nruncmd: [echo hello]\n\x00\xff binary ok"
    s = await drv.create(spec(1, 0, name="proc-1", userdata=ud))
    assert s.status == "running" and s.nova_status == "ACTIVE" and s.host == "cloudfs-compute"
    nova = conn.compute.get_server(s.id)
    assert nova.status == "ACTIVE" and nova.name == "proc-1"
    assert nova.metadata == {META_DEPLOYMENT: drv.deployment, META_PID: "1", META_PPID: "0"}
    ports = list(conn.network.ports(device_id=s.id))
    assert len(ports) == 1 and ports[0].network_id == conn.network.find_network("user").id
    assert s.addresses == (ports[0].fixed_ips[0]["ip_address"],)
    assert ipaddress.ip_address(s.addresses[0]) in ipaddress.ip_network("10.0.0.0/24")
    assert await drv.userdata(s.id) == ud
    assert (await drv.status(s.id)).metadata[META_PID] == "1"

    st = await drv.stop(s.id)
    assert st.status == "stopped" and conn.compute.get_server(s.id).status == "SHUTOFF"
    assert (await drv.stop(s.id)).status == "stopped"  # idempotent
    assert (await drv.status(s.id)).status == "stopped"
    assert (await drv.start(s.id)).status == "running"
    assert (await drv.start(s.id)).status == "running"
    assert conn.compute.get_server(s.id).status == "ACTIVE"

    # diagnostics (microversion 2.48) and console output of Nova's fake hypervisor
    stats = await drv.stats(s.id)
    assert stats.cpu_ns and stats.uptime_s and stats.memory_bytes and stats.memory_bytes % (1 << 20) == 0
    assert stats.block_write_bytes and stats.block_write_ops and stats.net_rx_bytes and stats.net_tx_packets
    assert b"FAKE CONSOLE OUTPUT" in await drv.console(s.id, 1 << 20)
    assert len(await drv.console(s.id, 4)) == 4

    rb = await drv.rebuild(s.id, "tiny", b"second life")
    assert (rb.id, rb.status, rb.addresses) == (s.id, "running", s.addresses)
    assert await drv.userdata(s.id) == b"second life"

    await drv.delete(s.id)
    gone = conn.compute.find_server(s.id)
    assert gone is None or gone.status == "DELETED"
    with pytest.raises(NotFound):
        await drv.status(s.id)
    await drv.delete(s.id)  # already gone: no error
    assert not list(conn.network.ports(device_id=s.id))


async def test_explicit_flavor_and_network(drv, conn):
    name = f"net-{uuid.uuid4().hex[:8]}"
    await drv.create_network(name, "10.78.0.0/24")
    try:
        s = await drv.create(spec(2, flavor="m1.small", networks=(name,)))
        assert conn.compute.get_server(s.id).flavor.name == "m1.small"
        assert ipaddress.ip_address(s.addresses[0]) in ipaddress.ip_network("10.78.0.0/24")
    finally:
        await trio.to_thread.run_sync(delete_servers, conn, drv.deployment)
        await drv.delete_network(name)


def live_migrations(conn, server_id: str) -> list[tuple[str, str, str]]:
    """Nova's live migrations of a server (status, source, destination), newest first."""
    return [(m.status, m.source_compute, m.dest_compute)
            for m in conn.compute.migrations(server_id=server_id, migration_type="live-migration")]


async def until_migration_settles(conn, server_id: str) -> list[tuple[str, str, str]]:
    """``live_migrations`` once the newest has a final status (Nova sets it
    just after the server's task ends)."""
    with trio.fail_after(30):
        while True:
            got = await trio.to_thread.run_sync(live_migrations, conn, server_id)
            if got and got[0][0] in ("completed", "error", "failed", "cancelled"):
                return got
            await trio.sleep(0.2)


async def test_live_migration_moves_a_running_server(drv, conn):
    """migrate: Nova live migration to the other compute host and back.
    Same id, address and port (bound to the new host); status, find and
    Nova agree on the host; Nova's migration completed; it still powers
    off and on where it is."""
    s = await drv.create(spec(80, name="mover"))
    assert s.host == HOST
    m = await drv.migrate(s.id, HOST2)
    assert (m.id, m.status, m.nova_status, m.task_state, m.host, m.addresses) == \
        (s.id, "running", "ACTIVE", None, HOST2, s.addresses)
    assert m.metadata == s.metadata
    assert (await drv.status(s.id)).host == HOST2
    assert [(x.id, x.host, x.status) for x in await drv.find(80)] == [(s.id, HOST2, "running")]
    nova = conn.compute.get_server(s.id)
    assert (nova.status, nova.compute_host, nova.hypervisor_hostname) == ("ACTIVE", HOST2, HOST2)
    [port] = conn.network.ports(device_id=s.id)
    assert port.binding_host_id == HOST2 and (port.fixed_ips[0]["ip_address"],) == s.addresses
    assert await until_migration_settles(conn, s.id) == [("completed", HOST, HOST2)]

    back = await drv.migrate(s.id, HOST)
    assert (back.id, back.status, back.host, back.addresses) == (s.id, "running", HOST, s.addresses)
    assert [(x.id, x.host) for x in await drv.find(80)] == [(s.id, HOST)]
    assert conn.compute.get_server(s.id).compute_host == HOST
    assert await until_migration_settles(conn, s.id) == [("completed", HOST2, HOST), ("completed", HOST, HOST2)]

    assert (await drv.stop(s.id)).host == HOST
    assert (await drv.start(s.id)).host == HOST
    await drv.delete(s.id)
    with pytest.raises(NotFound):
        await drv.migrate(s.id, HOST2)


async def test_migrate_refusals_leave_the_server_alone(drv, conn):
    """EINVAL for an unknown host, the host it is on, no host; EBUSY for a
    stopped server; NotFound for no such server; Nova is asked nothing."""
    s = await drv.create(spec(81))
    for host, why in (("no-such-host", "no compute host"), (HOST, "already runs on"), ("", "needs a compute host")):
        with pytest.raises(DriverError, match=why) as e:
            await drv.migrate(s.id, host)
        assert e.value.errno == errno.EINVAL
    await drv.stop(s.id)
    with pytest.raises(DriverError, match="not running [(]SHUTOFF[)]") as e:
        await drv.migrate(s.id, HOST2)
    assert e.value.errno == errno.EBUSY
    nova = conn.compute.get_server(s.id)
    assert (nova.status, nova.task_state, nova.compute_host) == ("SHUTOFF", None, HOST)
    assert live_migrations(conn, s.id) == []
    with pytest.raises(NotFound):
        await drv.migrate(str(uuid.uuid4()), HOST2)


async def test_two_daemons_moving_one_server_at_once(openstack_cloud, drv):  # noqa: F811
    """Two daemons (own connections) move one server to the same host at
    once: it moves once; the other is told it is busy (Nova's 409 or 500
    while the first move runs; or it is there already), never an EIO."""
    s = await drv.create(spec(84))
    other = OpenStackDriver(openstack_cloud.connect(), deployment=drv.deployment, poll_interval=0.3, boot_timeout=120)
    got = []

    async def one(d):
        try:
            got.append((await d.migrate(s.id, HOST2)).host)
        except DriverError as e:
            got.append(e.errno)

    async with trio.open_nursery() as n:
        n.start_soon(one, drv)
        n.start_soon(one, other)
    assert HOST2 in got and set(got) <= {HOST2, errno.EBUSY, errno.EINVAL}, got
    now = await drv.status(s.id)
    assert (now.host, now.status, now.task_state) == (HOST2, "running", None)
    await drv.delete(s.id)


@pytest.fixture
def big_flavor(conn):
    """A flavor the first compute host takes and the second cannot (350000
    MiB; it takes 300000: see HOST2_RESERVED_MB in controlplane.py)."""
    f = conn.compute.find_flavor("test.big")
    if f is None:
        f = conn.compute.create_flavor(name="test.big", ram=350_000, vcpus=1, disk=1)
    return f.name


async def test_a_migration_nova_refuses_is_eio_and_the_server_stays(drv, conn, big_flavor):
    """The destination has no room: Nova's scheduler refuses (HTTP 400, its
    migration record 'error'); EIO with Nova's words, and the server runs
    on where it was."""
    s = await drv.create(spec(82, flavor=big_flavor))
    assert s.host == HOST
    with pytest.raises(DriverError, match="No valid host was found") as e:
        await drv.migrate(s.id, HOST2)
    assert e.value.errno == errno.EIO and not isinstance(e.value, NotFound)
    now = await drv.status(s.id)
    assert (now.status, now.nova_status, now.task_state, now.host, now.addresses) == \
        ("running", "ACTIVE", None, HOST, s.addresses)
    assert await until_migration_settles(conn, s.id) == [("error", HOST, None)]
    await drv.delete(s.id)


async def test_migrate_past_its_deadline_is_eagain(openstack_cloud, drv, conn):  # noqa: F811
    """Nova's conductor paused (the API waits on its pre-checks): EAGAIN
    after the driver's call deadline; the move goes on once the conductor
    runs again, as status then shows."""
    import signal

    s = await drv.create(spec(83))
    quick = OpenStackDriver(conn, deployment=drv.deployment, timeout=3, poll_interval=0.3)
    with open(os.path.join(openstack_cloud.state, "run", "nova-conductor.pid")) as f:
        conductor = int(f.read().split()[0])
    os.kill(conductor, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(DriverTimeout, match="timed out after 3s") as e:
            await quick.migrate(s.id, HOST2)
        assert e.value.errno == errno.EAGAIN and time.monotonic() - t0 < 10
    finally:
        os.kill(conductor, signal.SIGCONT)
    with trio.fail_after(60):
        while True:
            now = await drv.status(s.id)
            if now.host == HOST2 and now.task_state is None:
                break
            await trio.sleep(0.3)
    assert (now.status, now.addresses) == ("running", s.addresses)
    await drv.delete(s.id)


async def test_unknown_image_flavor_network_are_notfound(drv):
    with pytest.raises(NotFound, match="image"):
        await drv.create(spec(3, image="no-such-image"))
    with pytest.raises(NotFound, match="flavor"):
        await drv.create(spec(3, flavor="m9.huge"))
    with pytest.raises(NotFound, match="network"):
        await drv.create(spec(3, networks=("no-such-net",)))
    with pytest.raises(NotFound):
        await drv.stop(str(uuid.uuid4()))
    with pytest.raises(DriverError, match="user data"):
        await drv.create(spec(3, userdata=b"x" * 60000))
    assert await drv.find_by_metadata() == []


@pytest.fixture
def huge_flavor(conn):
    """A flavor no host can take (NoValidHost from the scheduler)."""
    f = conn.compute.find_flavor("test.huge")
    if f is None:
        f = conn.compute.create_flavor(name="test.huge", ram=100_000_000, vcpus=1, disk=1)
    return f.name


async def test_nova_error_surfaces_with_fault_message(drv, huge_flavor):
    with pytest.raises(DriverError, match="No valid host was found"):
        await drv.create(spec(4, flavor=huge_flavor))
    # the failed server is not left behind
    assert [s for s in await drv.find_by_metadata() if s.nova_status != "DELETED"] == []
    # seen through status: state error with Nova's fault message
    s = await drv.boot(spec(5, flavor=huge_flavor))
    e = await drv.wait(s.id, ("error",))  # boot_timeout: a busy scheduler may take a while
    assert e.status == "error" and e.nova_status == "ERROR"
    assert "No valid host was found" in e.message
    assert (await drv.status(s.id)).message == e.message
    with pytest.raises(DriverError, match="ERROR"):
        await drv.stop(s.id)
    # find shows it as it is; a create never adopts a failed server, and removes it (no orphan)
    assert [x.id for x in await drv.find(5)] == [s.id]
    with pytest.raises(DriverError, match="No valid host was found"):
        await drv.create(spec(5, flavor=huge_flavor))
    with trio.fail_after(60):
        while await drv.find_by_metadata(pid=5):
            await trio.sleep(0.3)


async def test_twenty_concurrent_creates_give_twenty_servers(drv, conn):
    made = {}

    async def one(pid):
        made[pid] = await drv.create(spec(pid, userdata=f"pid {pid}".encode()))

    t0 = time.monotonic()
    async with trio.open_nursery() as n:
        for pid in range(100, 120):
            n.start_soon(one, pid)
    took = time.monotonic() - t0
    ours = await drv.find_by_metadata()
    assert len(ours) == 20 and {s.status for s in ours} == {"running"}
    assert sorted(int(s.metadata[META_PID]) for s in ours) == list(range(100, 120))
    assert {s.id for s in made.values()} == {s.id for s in ours}
    assert len({s.addresses for s in made.values()}) == 20
    print(f"20 concurrent creates to ACTIVE in {took:.1f}s")
    async with trio.open_nursery() as n:
        for s in ours:
            n.start_soon(drv.delete, s.id)
    assert await drv.find_by_metadata() == []


async def test_lost_reply_is_adopted_not_duplicated(drv, conn):
    """The first create's POST reached Nova but its reply was lost (we make
    the request ourselves and drop the answer); the retry adopts that server."""
    import base64

    meta = md(drv, 42)
    conn.compute.create_server(name="p42", image_id=conn.image.find_image("tiny").id,
                               flavor_id=conn.compute.find_flavor("m1.tiny").id,
                               networks=[{"uuid": conn.network.find_network("user").id}],
                               user_data=base64.b64encode(b"first").decode(), metadata=meta,
                               tags=drv.server_tags(meta))
    [found] = await drv.find(42)  # as it is: no waiting, no side effects
    assert found.metadata[META_PID] == "42"
    s = await drv.create(spec(42, userdata=b"first"))  # adopts it, waiting for its boot to settle
    assert s.id == found.id and s.status == "running" and s.addresses and s.nova_status == "ACTIVE"
    assert [x.id for x in await drv.find_by_metadata(pid=42)] == [s.id]
    assert await drv.find(43) == []


async def test_killed_mid_boot_then_restart_adopts(drv, conn):
    """A daemon cancelled right after asking Nova (killed mid-boot) and a new
    daemon (a new driver, new connection) creating the same pid: one server."""
    s0 = await drv.boot(spec(49))  # asked Nova, then died
    fresh = OpenStackDriver(conn, deployment=drv.deployment, poll_interval=0.3)
    s = await fresh.create(spec(49))
    assert s.id == s0.id and s.status == "running"
    assert [x.id for x in await fresh.find_by_metadata(pid=49)] == [s.id]

    with trio.move_on_after(0.05):
        await drv.create(spec(50))
    # the POST may or may not have gone out before the cancel; wait for the
    # abandoned thread to finish either way
    await trio.sleep(2)
    s = await fresh.create(spec(50))
    assert [x.id for x in await fresh.find_by_metadata(pid=50)] == [s.id]


async def test_racing_creates_for_one_pid_converge_on_one_server(drv):
    """Two daemons that both missed the other's server (a lost reply retried
    at the same moment): both end with the same, single server."""
    got = []

    async def one():
        got.append(await drv.create(spec(60)))

    async with trio.open_nursery() as n:
        n.start_soon(one)
        n.start_soon(one)
    assert got[0].id == got[1].id
    for _ in range(50):
        live = [s for s in await drv.find_by_metadata(pid=60) if s.nova_status != "DELETED"]
        if len(live) == 1:
            break
        await trio.sleep(0.2)
    assert [s.id for s in live] == [got[0].id]


async def test_another_deployments_servers_are_never_touched(drv, conn, deployment):
    """Two deployments on one project: the other one's server of the same
    pid is neither found, adopted, powered, rebuilt nor deleted."""
    other = OpenStackDriver(conn, deployment=f"{deployment}-other", poll_interval=0.3, boot_timeout=120)
    try:
        theirs = await other.create(spec(70))
        assert await drv.find(70) == []
        mine = await drv.create(spec(70))
        assert mine.id != theirs.id
        for call in (drv.status(theirs.id), drv.stop(theirs.id), drv.start(theirs.id),
                     drv.rebuild(theirs.id, "tiny", b""), drv.migrate(theirs.id, HOST2), drv.delete(theirs.id)):
            with pytest.raises(NotOurs, match="not deployment"):
                await call
        await drv.delete(mine.id)
        nova = conn.compute.get_server(theirs.id)
        assert (nova.status, nova.compute_host) == ("ACTIVE", HOST)
        assert live_migrations(conn, theirs.id) == []
        assert [x.id for x in await other.find(70)] == [theirs.id]
    finally:
        await trio.to_thread.run_sync(delete_servers, conn, other.deployment)


async def test_auth_failure_is_a_clear_error(openstack_cloud):  # noqa: F811
    import openstack

    bad = openstack.connect(auth_url=openstack_cloud.auth_url, username="admin", password="wrong",
                            project_name="admin", user_domain_name="Default", project_domain_name="Default",
                            region_name="RegionOne")
    d = OpenStackDriver(bad, timeout=30)
    with pytest.raises(DriverError, match="(?i)auth"):
        await d.list_images()


async def test_unanswering_cloud_times_out():
    """An endpoint that accepts connections and never answers: DriverError
    after the deadline, the trio loop never blocked."""
    import openstack

    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(50)
        port = ls.getsockname()[1]
        conn = openstack.connect(auth_url=f"http://127.0.0.1:{port}/v3", username="u", password="p",
                                 project_name="p", user_domain_name="Default", project_domain_name="Default",
                                 api_timeout=30)
        d = OpenStackDriver(conn, timeout=1.0)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await trio.sleep(0.05)
                ticks += 1

        t0 = time.monotonic()
        async with trio.open_nursery() as n:
            n.start_soon(ticker)
            with pytest.raises(DriverError, match="timed out after 1s"):
                await d.list_images()
            n.cancel_scope.cancel()
        assert time.monotonic() - t0 < 3
        assert ticks >= 10  # the loop kept running while the call hung


# --------------------------------------------------------------------------
# Through the namespace: CloudFS daemons (real ZooKeeper) whose reconcilers
# drive this OpenStack; ctl writes reach Nova servers.

@pytest.fixture
def os_root(zookeeper, zk_root, conn):
    """A fresh ZooKeeper root for the deployment; its servers (META_ROOT)
    are deleted after."""
    try:
        yield zk_root
    finally:
        delete_servers(conn, zk_root.rstrip("/"), META_ROOT)


def os_driver(openstack_cloud) -> OpenStackDriver:  # noqa: F811
    """A driver with its own connection (as a separate daemon would have),
    bound to its deployment by open_cloudfs."""
    return OpenStackDriver(openstack_cloud.connect(), poll_interval=0.3, boot_timeout=120)


async def wait_state(root, pid: int, state: str, timeout: float = 90) -> dict[str, str]:
    from tests.cloudfs.fsops import state_is

    return await state_is(root, pid, state, timeout)


async def record(fs, pid: int):
    return (await fs.records.get(pid)).value


async def test_proc_lifecycle_reaches_nova(openstack_cloud, zookeeper, os_root, conn):  # noqa: F811
    from cloudfs.namespace import open_cloudfs
    from tests.cloudfs.fsops import ctl, echo, ls

    drv = os_driver(openstack_cloud)
    async with open_cloudfs(zookeeper.hosts, drv, os_root, daemon_id="a") as fs:
        root = await fs.attach("", "")
        pid = int(await ctl(root, 1, "fork name=web"))
        await echo(root, f"/proc/{pid}/userdata", "#cloud-config\nruncmd: [true]\n")
        await ctl(root, pid, "exec tiny")
        st = await wait_state(root, pid, "running")
        vm = (await record(fs, pid)).vm
        nova = conn.compute.get_server(vm)
        assert nova.status == "ACTIVE" and nova.name == "web"
        assert nova.metadata[META_PID] == str(pid) and nova.metadata[META_PPID] == "1"
        assert nova.metadata[META_DEPLOYMENT] == fs.deployment_id and nova.metadata[META_ROOT] == fs.layout.root
        assert await drv.userdata(vm) == b"#cloud-config\nruncmd: [true]\n"
        port_ips = [ip["ip_address"] for p in conn.network.ports(device_id=vm) for ip in p.fixed_ips]
        assert st["addresses"] == " ".join(port_ips) and st["flavor"] in ("m1.tiny", "-")

        from tests.cloudfs.fsops import cat

        stats = dict(line.split(" ", 1) for line in (await cat(root, f"/proc/{pid}/stats")).decode().splitlines())
        assert stats["cpu_ns"].isdigit() and stats["net_rx_bytes"].isdigit(), stats
        assert b"FAKE CONSOLE OUTPUT" in await cat(root, f"/proc/{pid}/console")

        await ctl(root, pid, "stop")
        await wait_state(root, pid, "stopped")
        assert conn.compute.get_server(vm).status == "SHUTOFF"
        await ctl(root, pid, "start")
        await wait_state(root, pid, "running")
        assert conn.compute.get_server(vm).status == "ACTIVE"

        # exec on a running process: Nova rebuild with the new user-data
        await echo(root, f"/proc/{pid}/userdata", "second")
        await ctl(root, pid, "exec tiny")
        from tests.cloudfs.fsops import eventually

        async def rebuilt():
            return await drv.userdata(vm) == b"second" and (await record(fs, pid)).built_gen == (await record(fs, pid)).gen

        await eventually(rebuilt, 90, 0.3)
        await wait_state(root, pid, "running")
        assert (await record(fs, pid)).vm == vm

        # fork of a running process boots a copy; kill takes children first
        child = int(await ctl(root, pid, "fork"))
        await wait_state(root, child, "running")
        cvm = (await record(fs, child)).vm
        assert cvm != vm and conn.compute.get_server(cvm).metadata[META_PPID] == str(pid)
        await ctl(root, pid, "kill")

        async def gone():
            return await fs.records.get(pid) is None and str(pid) not in await ls(root, "/proc")

        await eventually(gone, 90, 0.3)
        for v in (vm, cvm):
            s = conn.compute.find_server(v)
            assert s is None or s.status == "DELETED"


async def test_migrate_through_the_namespace_reaches_nova(openstack_cloud, zookeeper, os_root, conn):  # noqa: F811
    """``migrate HOST`` on an OpenStack process: the reconciler live-migrates
    its server (same server, now on HOST in status and in Nova); a host
    Nova does not have fails the move and leaves it where it was."""
    from cloudfs.namespace import open_cloudfs
    from tests.cloudfs.fsops import ctl, eventually, status

    async with open_cloudfs(zookeeper.hosts, os_driver(openstack_cloud), os_root) as fs:
        root = await fs.attach("", "")
        pid = int(await ctl(root, 1, "fork"))
        await ctl(root, pid, "exec tiny")
        st = await wait_state(root, pid, "running")
        vm = (await record(fs, pid)).vm
        assert st["host"] == HOST
        await ctl(root, pid, f"migrate {HOST2}")

        async def moved():
            st = await status(root, pid)
            return st if st["host"] == HOST2 and st["state"] == "running" else None

        st = await eventually(moved, 90, 0.3)
        assert st["move"].startswith(f"from {HOST} to {HOST2} at "), st
        assert (await record(fs, pid)).vm == vm and conn.compute.get_server(vm).compute_host == HOST2
        assert st["addresses"] == " ".join(ip["ip_address"] for p in conn.network.ports(device_id=vm)
                                           for ip in p.fixed_ips)

        await ctl(root, pid, "migrate no-such-host")

        async def failed():
            st = await status(root, pid)
            return st if st.get("move", "").startswith("to no-such-host failed") else None

        st = await eventually(failed, 90, 0.3)
        assert (st["state"], st["host"]) == ("running", HOST2) and "no compute host" in st["move"], st
        assert conn.compute.get_server(vm).compute_host == HOST2


async def test_nova_error_in_status(openstack_cloud, zookeeper, os_root, huge_flavor):  # noqa: F811
    from cloudfs.namespace import open_cloudfs
    from tests.cloudfs.fsops import ctl

    async with open_cloudfs(zookeeper.hosts, os_driver(openstack_cloud), os_root) as fs:
        root = await fs.attach("", "")
        pid = int(await ctl(root, 1, "fork"))
        await ctl(root, pid, f"exec tiny flavor={huge_flavor}")
        st = await wait_state(root, pid, "error")
        assert "No valid host was found" in st["error"]
        pid2 = int(await ctl(root, 1, "fork"))
        await ctl(root, pid2, "exec tiny net=user")
        await wait_state(root, pid2, "running")


async def test_two_daemons_twenty_forks_give_twenty_servers(openstack_cloud, zookeeper, os_root, conn):  # noqa: F811
    from cloudfs.namespace import open_cloudfs
    from tests.cloudfs.fsops import ctl

    async with open_cloudfs(zookeeper.hosts, os_driver(openstack_cloud), os_root, daemon_id="a") as a, \
            open_cloudfs(zookeeper.hosts, os_driver(openstack_cloud), os_root, daemon_id="b") as b:
        roots = [await a.attach("", ""), await b.attach("", "")]
        pids = []

        async def one(i):
            r = roots[i % 2]
            pid = int(await ctl(r, 1, "fork"))
            pids.append(pid)
            await ctl(r, pid, "exec tiny")

        async with trio.open_nursery() as n:
            for i in range(20):
                n.start_soon(one, i)
        for pid in pids:
            await wait_state(roots[0], pid, "running", timeout=180)
        ours = [s for s in conn.compute.servers() if (s.metadata or {}).get(META_DEPLOYMENT) == a.deployment_id]
        seen = [(s.id, s.metadata.get(META_PID), s.status, s.task_state) for s in ours]
        recs = {p: (await record(a, p)).vm for p in pids}
        assert len(ours) == 20, (seen, recs)
        assert sorted(int(s.metadata[META_PID]) for s in ours) == sorted(pids), (seen, recs)
        assert set(recs.values()) == {s.id for s in ours}, (seen, recs)


async def test_daemon_stopped_mid_boot_restart_adopts(openstack_cloud, zookeeper, os_root, conn):  # noqa: F811
    """The daemon acting on a process stops while Nova boots its server (its
    record names no server yet); the next daemon adopts that server."""
    from cloudfs.namespace import open_cloudfs
    from tests.cloudfs.fsops import ctl

    first = os_driver(openstack_cloud)
    with trio.CancelScope() as scope:
        async with open_cloudfs(zookeeper.hosts, first, os_root, daemon_id="doomed") as fs:
            root = await fs.attach("", "")
            pid = int(await ctl(root, 1, "fork"))
            await ctl(root, pid, "exec tiny")
            while not await first.find(pid):
                await trio.sleep(0.05)
            assert (await record(fs, pid)).vm is None  # Nova has it, the record not yet
            doomed = fs
            scope.cancel()
    # the process is gone: so is its ZooKeeper session (the cancelled
    # open_cloudfs could not close it)
    await trio.to_thread.run_sync(doomed.store.client.stop)
    await trio.to_thread.run_sync(doomed.store.client.close)
    async with open_cloudfs(zookeeper.hosts, os_driver(openstack_cloud), os_root, daemon_id="next") as fs:
        root = await fs.attach("", "")
        await wait_state(root, pid, "running")
        servers = await first.find(pid)
        assert [s.id for s in servers] == [(await record(fs, pid)).vm]


def test_changes_since_reaches_back_before_the_stamp():
    from cloudfs.drivers.openstack import SINCE_MARGIN, _earlier

    assert _earlier("2026-11-21T09:26:36Z", SINCE_MARGIN) == "2026-11-21T09:26:31Z"
    assert _earlier("2026-11-21T00:00:02Z", 5) == "2026-11-20T23:59:57Z"
    assert _earlier("2026-11-21T09:26:36+00:00", 1) == "2026-11-21T09:26:35Z"
    assert _earlier("not a stamp", 5) == "not a stamp"


async def test_a_change_the_shared_poll_misses_is_still_seen(openstack_cloud, drv, huge_flavor,  # noqa: F811
                                                              monkeypatch):
    """CI once saw a NoValidHost server stay 'BUILD' for a waiter: the poll
    had moved past the second Nova stamped its change with.  Whatever the
    poll misses, each waiter looks at its own server now and then.  (The
    scheduler is paused so that the waiter first sees BUILD.)"""
    import signal

    import cloudfs.drivers.openstack as osd

    async def blind_round(self):  # a poll that never reports anything
        return None

    monkeypatch.setattr(osd.OpenStackDriver, "_poll_round", blind_round)
    monkeypatch.setattr(osd, "RECHECK_INTERVAL", 1.0)
    with open(os.path.join(openstack_cloud.state, "run", "nova-scheduler.pid")) as f:
        scheduler = int(f.read().split()[0])
    os.kill(scheduler, signal.SIGSTOP)
    s = None
    try:
        s = await drv.boot(spec(6, name="blind", flavor=huge_flavor))
        seen = []

        async def waiter():
            seen.append(await drv.wait(s.id, ("error",), ports=False))

        async with trio.open_nursery() as n:
            n.start_soon(waiter)
            await trio.sleep(1.5)
            assert seen == []  # it saw BUILD
            os.kill(scheduler, signal.SIGCONT)
            with trio.fail_after(60):
                while not seen:
                    await trio.sleep(0.1)
        assert seen[0].nova_status == "ERROR" and "No valid host was found" in seen[0].message
    finally:
        os.kill(scheduler, signal.SIGCONT)
        if s is not None:
            await drv.delete(s.id, wait=False)


def test_scope_names_keystone_region_and_project():
    import openstack.config
    import openstack.connection

    from cloudfs.drivers.openstack import _cloud_scope

    def scope(**kw):
        region = openstack.config.get_cloud_region(load_yaml_config=False, load_envvars=False, **kw)
        return _cloud_scope(openstack.connection.Connection(config=region))

    base = dict(auth_url="http://k:5000/v3", username="u", password="p", project_name="demo",
                project_domain_name="Default", user_domain_name="Default", region_name="RegionOne")
    s = scope(**base)
    assert s == "openstack!http://k:5000!RegionOne!default/demo"
    assert scope(**{**base, "auth_url": "http://k:5000/"}) == s
    assert scope(**{**base, "region_name": "RegionTwo"}) != s
    assert scope(**{**base, "project_name": "other"}) != s


async def test_two_deployments_of_one_name_keep_to_their_servers(openstack_cloud, zookeeper, private_zookeeper,  # noqa: F811
                                                                  os_root, conn):
    """Two daemons with fresh ZooKeepers and the same deployment name on one
    project (two `cloudfs up --driver openstack`, both /cloudfs/default):
    each pid 2 gets its own server, and killing one leaves the other's."""
    from cloudfs.namespace import open_cloudfs
    from tests.cloudfs.fsops import cat, ctl

    async with open_cloudfs(zookeeper.hosts, os_driver(openstack_cloud), os_root, daemon_id="a") as a, \
            open_cloudfs(private_zookeeper.hosts, os_driver(openstack_cloud), os_root, daemon_id="b") as b:
        assert a.deployment_id != b.deployment_id
        aroot, broot = await a.attach("", ""), await b.attach("", "")
        for root in (aroot, broot):
            assert int(await ctl(root, 1, "fork")) == 2
            await ctl(root, 2, "exec tiny")
        await wait_state(aroot, 2, "running")
        await wait_state(broot, 2, "running")
        avm, bvm = (await record(a, 2)).vm, (await record(b, 2)).vm
        assert avm != bvm
        assert conn.compute.get_server(avm).metadata[META_DEPLOYMENT] == a.deployment_id
        assert conn.compute.get_server(bvm).metadata[META_DEPLOYMENT] == b.deployment_id
        await ctl(broot, 2, "kill")
        with trio.fail_after(90):
            assert await cat(broot, "/proc/1/wait") == b"2 p2 killed killed\n"
        gone = conn.compute.find_server(bvm)
        assert gone is None or gone.status == "DELETED"
        assert conn.compute.get_server(avm).status == "ACTIVE"
        assert (await record(a, 2)).vm == avm
