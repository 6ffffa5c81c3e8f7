"""/hosts: one entry per live daemon of a deployment (ephemeral znodes in
ZooKeeper), with its driver, scope and the processes whose VMs it runs; an
entry goes with its daemon's session, and a name is one daemon's at a time."""

import errno

import pytest
import trio

from cloudfs.drivers.fake import FakeDriver
from cloudfs.hosts import check_host_name
from cloudfs.namespace import open_cloudfs
from ninep.errors import FsError
from tests.cloudfs.fsops import cat, eventually, ls, vm


def kv(text: bytes) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in text.decode().splitlines())


async def _listed(root, names):
    return await ls(root, "/hosts") == names


async def test_every_live_daemon_has_an_entry(cfs, cfs2):
    root = await cfs.attach("", "")
    await eventually(lambda: _listed(root, ["daemon-a", "daemon-b"]))
    assert "hosts" in await ls(root, "/")
    pid = await vm(root)
    owner = cfs if pid in cfs.reconciler.owned else cfs2
    other = cfs2 if owner is cfs else cfs
    got = kv(await cat(root, f"/hosts/{owner.daemon_id}"))
    assert got["name"] == got["daemon"] == owner.daemon_id
    assert got["driver"] == "fake" and got["scope"] == "fake" and got["since"].endswith("Z")
    assert str(pid) in got["processes"].split()
    assert str(pid) not in kv(await cat(root, f"/hosts/{other.daemon_id}"))["processes"].split()
    # a process reads it too (its view), and nothing else is there
    guest = cfs.view_for(pid)
    assert kv(await cat(guest, f"/hosts/{owner.daemon_id}"))["daemon"] == owner.daemon_id
    for bad in ("nope", "-x", "x" * 64):
        with pytest.raises(FsError) as e:
            await cat(guest, f"/hosts/{bad}")
        assert e.value.errno == errno.ENOENT


async def test_an_entry_goes_with_its_daemon_and_a_name_waits_for_its_holder(zookeeper, zk_root, cfs):
    root = await cfs.attach("", "")
    driver = FakeDriver()
    async with open_cloudfs(zookeeper.hosts, driver, zk_root, daemon_id="first", host="h1"):
        await eventually(lambda: _listed(root, ["daemon-a", "h1"]))
        # a second daemon given the same name (or the same one restarted while its
        # old session lives) waits for the name instead of taking it
        async with open_cloudfs(zookeeper.hosts, driver, zk_root, daemon_id="second", host="h1") as second:
            await trio.sleep(0.3)
            assert not second.hosts.registered
            assert kv(await cat(root, "/hosts/h1"))["daemon"] == "first"
        await eventually(lambda: _listed(root, ["daemon-a", "h1"]))
    await eventually(lambda: _listed(root, ["daemon-a"]))


async def test_the_name_passes_to_the_waiting_daemon(zookeeper, zk_root, cfs):
    root = await cfs.attach("", "")
    driver = FakeDriver()
    async with open_cloudfs(zookeeper.hosts, driver, zk_root, daemon_id="second", host="h1") as second:
        async with open_cloudfs(zookeeper.hosts, driver, zk_root, daemon_id="first", host="h1") as first:
            await eventually(lambda: _holder(root, "h1", {"first", "second"}))
            holder = kv(await cat(root, "/hosts/h1"))["daemon"]
        if holder == "first":  # the one that stayed takes the name once the other's session ended
            await eventually(lambda: _holder(root, "h1", {"second"}), timeout=15)
            assert second.hosts.registered


async def _holder(root, name, daemons):
    try:
        return kv(await cat(root, f"/hosts/{name}"))["daemon"] in daemons
    except FsError:
        return False


async def test_a_corrupt_entry_is_eio(cfs):
    root = await cfs.attach("", "")
    await cfs.store.create(f"{cfs.layout.hosts}/junk", b"{not json")
    with pytest.raises(FsError) as e:
        await cat(root, "/hosts/junk")
    assert e.value.errno == errno.EIO


def test_host_names():
    for good in ("a", "host-1", "d1.example", "A_b", "x" * 63):
        assert check_host_name(good) == good
    for bad in ("", "-a", ".a", "a/b", "x" * 64, "é", "a b", ".."):
        with pytest.raises(ValueError):
            check_host_name(bad)
