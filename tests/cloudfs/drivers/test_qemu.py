"""cloudfs.drivers.qemu against real QEMU (TCG) and a real 9P server.

The guests mount a :class:`ninep.memfs.MemFS` served on each VM's channel
(the driver does not care what serves the namespace), so the driver is
tested on its own: create, status, stop/start over QMP, find by a second driver
instance (re-adoption), rebuild, a guest's own exit and its message, delete.
Every QEMU is killed when the test ends (``kill_all`` in a finally).
"""

from __future__ import annotations

import os
import pwd
import stat
import time
from pathlib import Path

import pytest
import trio

from cloudfs import imagestore
from cloudfs.drivers.base import META_DEPLOYMENT, META_PID, DriverError, NotFound, ServerSpec
from cloudfs.drivers.qemu import FLAVORS, QemuDriver, probe_kvm
from ninep.memfs import MemFS
from ninep.server import Server
from tests.guestfixtures import CACHE_DIR

pytestmark = pytest.mark.guest

SECRET = "0123456789abcdef0123456789abcdef"
DEPLOYMENT = "d" * 32


def driver(state, deployment: str = DEPLOYMENT, **kw) -> QemuDriver:
    """A QEMU driver bound to ``deployment`` (TCG unless told)."""
    d = QemuDriver(state, **{"accel": "tcg", **kw})
    d.bind(deployment, "/test/qemu")
    return d


def spec(pid: int = 7, userdata: bytes = b"", **kw) -> ServerSpec:
    return ServerSpec(**{"pid": pid, "ppid": 1, "name": "web", "image": "tiny", "flavor": "m1.tiny",
                         "networks": ("user",), "userdata": userdata, **kw})


@pytest.fixture
def state(tiny_image, tmp_path):
    s = tmp_path / "state"
    imagestore.install_image(s, tiny_image)
    try:
        yield s
    finally:
        QemuDriver(s, accel="tcg").kill_all()


class Served:
    """One MemFS and the drivers that serve it on their VMs' channels:
    :meth:`driver` makes a driver whose :meth:`QemuDriver.run` (the channel
    supervisor) runs until :meth:`stop` (a daemon going away)."""

    def __init__(self, state, nursery: trio.Nursery):
        self.fs, self.state, self.nursery = MemFS(), state, nursery
        self.pids: list[int] = []  # the pids channels were served for
        self.scopes: dict[int, trio.CancelScope] = {}

    async def serve(self, pid: int, listener) -> None:
        self.pids.append(pid)
        await Server(self.fs).serve_listeners([listener])

    def driver(self, deployment: str = DEPLOYMENT, **kw) -> QemuDriver:
        d = driver(self.state, deployment, channel_handler=self.serve, **kw)
        scope = trio.CancelScope()

        async def run():
            with scope:
                await d.run()

        self.scopes[id(d)] = scope
        self.nursery.start_soon(run)
        return d

    def stop(self, d: QemuDriver) -> None:
        self.scopes.pop(id(d)).cancel()


@pytest.fixture
async def served(state):
    async with trio.open_nursery() as nursery:
        try:
            yield Served(state, nursery)
        finally:
            nursery.cancel_scope.cancel()


async def until(check, timeout: float = 90.0, what: str = "condition"):
    with trio.move_on_after(timeout):
        while True:
            v = await check()
            if v:
                return v
            await trio.sleep(0.2)
    raise AssertionError(f"{what} not met within {timeout}s")


async def test_store_flavors_networks(state, tiny_image):
    d = driver(state)
    [img] = await d.list_images()
    assert (img.name, img.id, img.size, img.checksum) == ("tiny", tiny_image.id, tiny_image.size,
                                                          tiny_image.checksum)
    assert img.disk_format == "kernel+initramfs" and img.status == "active" and img.created.endswith("Z")
    again = imagestore.install_image(state, tiny_image)  # unchanged: left alone
    assert again.created == img.created
    # Debian's bzImage holds a PVH-bootable vmlinux, which the driver boots directly
    assert again.kernel_pvh is not None and again.kernel_pvh.read_bytes()[:4] == b"\x7fELF"
    assert imagestore.has_pvh_note(again.kernel_pvh.read_bytes())
    assert not imagestore.has_pvh_note(b"\x7fELF" + bytes(100)) and imagestore.extract_vmlinux(b"junk") is None
    assert await d.list_flavors() == list(FLAVORS) == ["m1.tiny", "m1.small"]
    [net] = await d.list_networks()
    assert (net.name, net.cidr) == ("user", "10.0.2.0/24")
    for image, flavor, nets in (("nope", "m1.tiny", ("user",)), ("tiny", "m9.huge", ("user",)),
                                ("tiny", "m1.tiny", ("lab",))):
        with pytest.raises(NotFound):
            await d.create(spec(image=image, flavor=flavor, networks=nets))
    assert list((state / "vms").iterdir()) == []
    for call in (d.status("vm-nope"), d.stop("vm-nope"), d.start("vm-nope"), d.rebuild("vm-nope", "tiny", b"")):
        with pytest.raises(NotFound):
            await call
    await d.delete("vm-nope")  # idempotent
    assert await d.find(7) == []
    assert imagestore.build_image_main("windows", state) == 2


def test_build_image_main_installs_and_caches(tmp_path, tiny_image, capsys):
    state = tmp_path / "state"
    (state / "cache").mkdir(parents=True)
    (state / "cache" / "guest").symlink_to(CACHE_DIR)  # the session's warm build cache
    assert imagestore.build_image_main("tiny", state) == 0
    first = imagestore.get_image(state, "tiny")
    assert first is not None and first.checksum == tiny_image.checksum and first.id == tiny_image.id
    assert "using cached" in capsys.readouterr().out
    assert imagestore.build_image_main("tiny", state) == 0
    assert imagestore.get_image(state, "tiny") == first  # nothing rebuilt or reinstalled
    assert [i.name for i in imagestore.list_images(state)] == ["tiny"]


async def test_lifecycle_readoption_rebuild_and_exit(state, served):
    fs = served.fs
    d = served.driver()
    userdata = b"echo one > /cloud/one\ncat /cloud/wait/go\n"
    s = await d.create(spec(userdata=userdata, secret=SECRET))
    assert s.status == "running" and s.addresses == ("10.0.2.15",)
    vmdir = state / "vms" / s.id
    qpid = d.qemu_pid(s.id)
    assert qpid is not None
    cmdline = open(f"/proc/{qpid}/cmdline", "rb").read()
    assert SECRET.encode() not in cmdline  # never on the command line
    assert b"-kernel\0" + str(state / "images" / "tiny" / "vmlinux").encode() in cmdline
    qemu_ppid = int(open(f"/proc/{qpid}/stat").read().rsplit(") ", 1)[1].split()[1])
    assert os.getsid(qpid) != os.getsid(0) and qemu_ppid != os.getpid()  # own session, not our child
    assert "Seccomp:\t2" in open(f"/proc/{qpid}/status").read()  # -sandbox on: a seccomp filter
    if os.geteuid() == 0:  # -runas: QEMU dropped root once its files were open
        assert os.stat(f"/proc/{qpid}").st_uid == pwd.getpwnam("nobody").pw_uid
    # its own network namespace: the guest's only peer is the channel
    assert os.stat(f"/proc/{qpid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
    assert stat.S_IMODE((vmdir / "meta.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(vmdir.stat().st_mode) == 0o700

    # the guest booted, mounted the 9P server and ran the user-data
    await until(lambda: _has(fs, "one"), what="guest wrote /one")
    assert bytes(fs.root.children["one"].data) == b"one\n"
    console = (vmdir / "console.log").read_text(errors="replace")
    assert "cloudfs-boot: mounted /cloud as process 7" in console
    assert served.pids == [7]

    # QMP power control
    assert (await d.stop(s.id)).status == "stopped"
    assert (await d.status(s.id)).status == "stopped"
    assert (await d.start(s.id)).status == "running"

    # a second driver instance (a restarted daemon) finds it by its tags,
    # and its create adopts it instead of booting another
    served.stop(d)
    d2 = served.driver()
    [found] = await d2.find(7)
    assert found.id == s.id and found.status == "running"
    assert await d2.find(8) == []
    assert (await d2.create(spec(secret=SECRET))).id == s.id
    assert d2.qemu_pid(s.id) == qpid and len(list((state / "vms").iterdir())) == 1

    # rebuild: same id, new QEMU, new user-data; this one exits by itself
    r = await d2.rebuild(s.id, "tiny", b"echo two > /cloud/two\nexit 3\n")
    assert r.id == s.id and r.status == "running"
    assert d2.qemu_pid(s.id) not in (None, qpid)
    assert bytes(fs.root.children["one"].data) == b"one\n"
    await until(lambda: _has(fs, "two"), what="the rebuilt guest wrote /two")
    # the old QEMU's channel was closed, the new one's opened
    assert all(ch.key[1] != qpid for ch in d2._channels.values())
    assert len(served.pids) >= 2 and set(served.pids) == {7}
    exited = await until(lambda: _exited(d2, s.id), what="guest exit")
    assert exited.message == f"exit 3: user-data exited with status 3 (console: {d2.console_path(s.id)})", exited
    assert bytes(fs.root.children["two"].data) == b"two\n"
    with pytest.raises(DriverError):
        await d2.start(s.id)

    await d2.delete(s.id)
    assert not vmdir.exists() and (state / "logs" / f"{s.id}.console.log").exists()
    with pytest.raises(NotFound):
        await d2.status(s.id)
    assert await d2.find(7) == []


async def test_delete_ends_a_running_qemu(state, served):
    d = served.driver()
    s = await d.create(spec(userdata=b"sleep 1000\n", flavor=""))
    qpid = d.qemu_pid(s.id)
    t = time.monotonic()
    await d.delete(s.id)
    assert time.monotonic() - t < 10
    assert not os.path.exists(f"/proc/{qpid}/cmdline") or b"qemu" not in open(f"/proc/{qpid}/cmdline", "rb").read() \
        or open(f"/proc/{qpid}/stat").read().split(") ")[1][0] == "Z"
    assert d.qemu_pid(s.id) is None and list((state / "vms").iterdir()) == []


def test_kvm_probe_answers_within_its_timeout(tiny_image):
    t = time.monotonic()
    ok = probe_kvm("qemu-system-x86_64", tiny_image.kernel, timeout=5.0)
    took = time.monotonic() - t
    assert took < 8.0, took
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert ok is False


async def _has(fs: MemFS, name: str) -> bool:
    return name in fs.root.children and bool(fs.root.children[name].data)


async def _exited(d: QemuDriver, sid: str):
    s = await d.status(sid)
    return s if s.status == "exited" else None


async def test_another_deployments_vms_are_never_touched(state):
    """A state dir whose VMs belong to an earlier deployment (the daemon was
    started again with a fresh ZooKeeper tree: a new deployment id): the new
    deployment's pid 7 gets its own VM, and the old VM is never found,
    powered, rebuilt or deleted by it."""
    old = driver(state, deployment="a" * 32)
    theirs = await old.create(spec(userdata=b"sleep 1000\n"))
    new = driver(state, deployment="b" * 32)
    assert await new.find(7) == []
    mine = await new.create(spec(userdata=b"sleep 1000\n"))
    assert mine.id != theirs.id
    assert [s.id for s in await new.find(7)] == [mine.id] and [s.id for s in await old.find(7)] == [theirs.id]
    for call in (new.status(theirs.id), new.stop(theirs.id), new.start(theirs.id),
                 new.rebuild(theirs.id, "tiny", b""), new.delete(theirs.id)):
        with pytest.raises(NotFound):
            await call
    assert (await old.status(theirs.id)).status == "running" and old.qemu_pid(theirs.id) is not None
    meta = (state / "vms" / mine.id / "meta.json").read_text()
    assert f'"{META_DEPLOYMENT}": "{"b" * 32}"' in meta and f'"{META_PID}": "7"' in meta
    await new.delete(mine.id)
    assert old.qemu_pid(theirs.id) is not None


async def test_auto_accel_probes_once_and_remembers(state, tiny_image):
    d = QemuDriver(state, accel="auto", kvm_probe_timeout=5.0)
    [img] = imagestore.list_images(state)
    first = await d._choose_accel(img.kernel)
    assert first in ("kvm", "tcg")
    t = time.monotonic()
    again = await QemuDriver(state, accel="auto")._choose_accel(img.kernel)  # a restarted daemon
    assert again == first and time.monotonic() - t < 1.0


async def test_networks_have_a_hub_each(state):
    """create_network starts a hub QEMU with a free /24; names, cidrs and
    the user network are checked; a hub that died is started again; delete
    ends the hub (EBUSY while a VM holds an address on it: the VMs that use
    networks are in tests/test_e2e_qemu.py)."""
    import errno

    from cloudfs.drivers import qemunet

    d = driver(state)
    lab = await d.create_network("lab")
    other = await d.create_network("other", "192.168.77.0/24")
    assert (lab.name, lab.cidr, lab.status) == ("lab", "10.42.1.0/24", "active")
    assert other.cidr == "192.168.77.0/24"
    assert [(n.name, n.cidr) for n in await d.list_networks()] == [
        ("user", "10.0.2.0/24"), ("lab", "10.42.1.0/24"), ("other", "192.168.77.0/24")]
    for name, cidr, err in (("lab", None, errno.EEXIST), ("user", None, errno.EEXIST),
                            ("x", "10.42.1.0/25", errno.EINVAL), ("y", "8.8.8.0/24", errno.EINVAL),
                            ("z", "10.0.2.0/24", errno.EINVAL), ("w", "nonsense", errno.EINVAL),
                            ("v", "127.0.0.0/16", errno.EINVAL), ("bad,name", None, errno.EINVAL),
                            ("a'b", None, errno.EINVAL)):
        with pytest.raises(DriverError) as e:
            await d.create_network(name, cidr)
        assert e.value.errno == err, (name, cidr)
    net = d._net("lab")
    assert net.dir.parent == state / "nets" and net.dir.name == f"n-{lab.id[4:10]}"  # short: unix sockets
    assert net.port("vm-0123456789ab") == net.dir / "0123456789ab.sock"
    hub = qemunet.hub_pid(net)
    assert hub is not None and "Seccomp:\t2" in open(f"/proc/{hub}/status").read()
    # another deployment sees none of them
    assert [n.name for n in await driver(state, deployment="e" * 32).list_networks()] == ["user"]
    # a hub that died shows down, and is started again when a VM joins
    os.kill(hub, 9)
    await until(lambda: _status_of(d, "lab", "down"), timeout=10, what="hub down")
    await trio.to_thread.run_sync(d._restart_hub, net)
    assert [n.status for n in await d.list_networks() if n.name == "lab"] == ["active"]
    # EBUSY while a VM holds an address; an address of a VM that is gone does not count
    (state / "vms" / "vm-holder").mkdir()
    net.hosts = {"vm-holder": "10.42.1.2", "vm-gone": "10.42.1.3"}
    net.save()
    with pytest.raises(DriverError) as e:
        await d.delete_network("lab")
    assert e.value.errno == errno.EBUSY and "1 VM" in e.value.message
    (state / "vms" / "vm-holder").rmdir()
    with pytest.raises(DriverError) as e:
        await d.delete_network("user")
    assert e.value.errno == errno.EINVAL
    hub = qemunet.hub_pid(d._net("lab"))
    await d.delete_network("lab")
    assert not net.dir.exists() and not qemunet.qemu_running(hub, str(net.qmp))
    with pytest.raises(NotFound):
        await d.delete_network("lab")
    assert [n.name for n in await d.list_networks()] == ["user", "other"]
    assert (await d.create_network("again")).cidr == "10.42.1.0/24"  # the freed /24 is used again


async def _status_of(d: QemuDriver, name: str, status: str) -> bool:
    return any(n.name == name and n.status == status for n in await d.list_networks())


def test_network_addresses():
    from cloudfs.drivers import qemunet

    assert qemunet.pick_cidr([]) == "10.42.1.0/24"
    assert qemunet.pick_cidr(["10.42.1.0/24", "10.42.2.0/23", "10.42.4.0/25"]) == "10.42.5.0/24"
    assert qemunet.check_cidr("172.16.5.7/29", []) == "172.16.5.0/29"
    for bad in ("10.0.0.0/8", "10.1.0.0/30", "100.64.0.0/16", "fd00::/64", "10.0.2.128/25"):
        with pytest.raises(DriverError):
            qemunet.check_cidr(bad, [])
    net = qemunet.Net("lab", "net-x", "10.9.9.0/29", "t", {}, Path("/nonexistent"))
    got = [qemunet.allocate(net, f"vm-{i}") for i in range(5)]
    assert got == ["10.9.9.2", "10.9.9.3", "10.9.9.4", "10.9.9.5", "10.9.9.6"]  # .1 left for a gateway
    assert qemunet.allocate(net, "vm-0") == "10.9.9.2"  # kept
    with pytest.raises(DriverError, match="full"):
        qemunet.allocate(net, "vm-9")
    del net.hosts["vm-2"]
    assert qemunet.allocate(net, "vm-9") == "10.9.9.4"  # a freed address is used again
    assert qemunet.mac_of("10.42.1.2") == "52:54:0a:2a:01:02"
