"""cloudfs.catalog: /images and /net, and exec's checks, answered from
listings cached per daemon (one driver call per kind per staleness period,
refetched on a miss at most once a second), and the one translation point
for driver failures: an outage is an errno with the driver's message (also
over 9P2000.u), logged once in one line, and the rest of the tree goes on.
Real ZooKeeper, the fake driver, trio's MockClock for the staleness."""

from __future__ import annotations

import errno
import logging
import os

import pytest
import trio

from cloudfs.catalog import CATALOG_TTL, MISS_INTERVAL
from cloudfs.drivers.base import Image
from ninep.client import open_client
from ninep.errors import FsError
from ninep.server import Server
from tests.cloudfs.fsops import cat, ctl, ls, walk


async def ls_l(root, path: str) -> list[str]:
    """``ls -l``: readdir, then a walk and getattr of every entry."""
    names = await ls(root, path)
    for n in names:
        await (await walk(root, f"{path}/{n}")).getattr()
    return names


def twenty_images(driver) -> None:
    for i in range(20):
        driver.images[f"img{i:02d}"] = Image(f"id-{i}", f"img{i:02d}", "active", 1, "qcow2", "0" * 32,
                                              "2026-01-01T00:00:00Z")


async def test_ls_l_of_twenty_images_is_one_listing(cfs, driver, mock_clock):
    twenty_images(driver)
    root = await cfs.attach("", "")
    before = driver.listings["list_images"]
    for _ in range(5):
        assert len(await ls_l(root, "/images")) == 22
        await cat(root, "/images/img07")
    assert driver.listings["list_images"] - before == 1
    mock_clock.jump(CATALOG_TTL)
    await ls_l(root, "/images")
    assert driver.listings["list_images"] - before == 2


async def test_a_hundred_execs_list_each_kind_once(cfs, driver, mock_clock):
    root = await cfs.attach("", "")
    pids = [int(await ctl(root, 1, "fork")) for _ in range(100)]
    before = dict(driver.listings)
    for pid in pids:
        await ctl(root, pid, "exec tiny flavor=m1.small net=user")
    for kind in ("list_images", "list_flavors", "list_networks"):
        assert driver.listings[kind] - before.get(kind, 0) <= 1, driver.listings


async def test_a_miss_refetches_at_most_once_per_interval(cfs, driver, mock_clock):
    root = await cfs.attach("", "")
    await ls(root, "/images")
    mock_clock.jump(MISS_INTERVAL)
    before = driver.listings["list_images"]
    for i in range(50):  # a client asking for names that do not exist
        with pytest.raises(FsError) as e:
            await walk(root, f"/images/nope{i}")
        assert e.value.errno == errno.ENOENT
    assert driver.listings["list_images"] - before == 1
    # an image uploaded behind cloudfs's back is found by name at once
    driver.images["fresh"] = Image("id-f", "fresh", "active", 1, "qcow2", "0" * 32, "2026-01-02T00:00:00Z")
    mock_clock.jump(MISS_INTERVAL)
    assert b"name fresh\n" in await cat(root, "/images/fresh")
    pid = int(await ctl(root, 1, "fork"))
    driver.images["fresher"] = Image("id-g", "fresher", "active", 1, "qcow2", "0" * 32, "2026-01-02T00:00:00Z")
    mock_clock.jump(MISS_INTERVAL)
    await ctl(root, pid, "exec fresher")  # exec checks by name too
    with pytest.raises(FsError) as e:
        await ctl(root, pid, "exec nope")
    assert e.value.errno == errno.EINVAL and "unknown image 'nope'" in e.value.message


async def test_touch_net_refreshes_the_networks(cfs, driver, mock_clock):
    root = await cfs.attach("", "")
    assert await ls(root, "/net") == ["user"]
    node = await walk(root, "/net")
    await node.create("lab", 0o644, os.O_RDONLY, 0, 0)
    assert await ls(root, "/net") == ["user", "lab"]
    with pytest.raises(FsError) as e:
        await node.create("lab", 0o644, os.O_RDONLY, 0, 0)
    assert e.value.errno == errno.EEXIST


async def test_a_driver_outage_is_an_errno_with_its_message(cfs, driver, mock_clock, caplog):
    root = await cfs.attach("", "")
    driver.fail_next("list_images", "openstack: list images: cannot reach the cloud: Connection refused")
    caplog.set_level(logging.INFO)
    before = driver.listings["list_images"]
    for _ in range(3):
        with pytest.raises(FsError) as e:
            await ls(root, "/images")
        assert e.value.errno == errno.EIO and "cannot reach the cloud: Connection refused" in e.value.message
    assert driver.listings["list_images"] - before == 1  # the failure is remembered for a moment
    lines = [r for r in caplog.records if "cannot reach the cloud" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None and "\n" not in lines[0].getMessage()
    assert await ls(root, "/proc") == ["1"]  # the rest of the tree goes on
    pid = int(await ctl(root, 1, "fork"))
    mock_clock.jump(MISS_INTERVAL)
    assert "tiny" in await ls(root, "/images")  # back
    await ctl(root, pid, "exec tiny")


async def test_a_driver_that_lets_other_exceptions_out(cfs, driver, mock_clock, caplog):
    async def broken():
        raise KeyError("flavor")

    driver.list_flavors = broken
    root = await cfs.attach("", "")
    pid = int(await ctl(root, 1, "fork"))
    with pytest.raises(FsError) as e:
        await ctl(root, pid, "exec tiny")
    assert e.value.errno == errno.EIO and e.value.message == "list flavors: KeyError: 'flavor'"
    assert [r.exc_info for r in caplog.records if "KeyError" in r.getMessage()] == [None]


async def test_timeouts_are_eagain(cfs, driver, mock_clock):
    from cloudfs.drivers.base import DriverTimeout

    async def slow():
        raise DriverTimeout("openstack: list networks timed out after 60s")

    driver.list_networks = slow
    root = await cfs.attach("", "")
    with pytest.raises(FsError) as e:
        await ls(root, "/net")
    assert e.value.errno == errno.EAGAIN and "timed out" in e.value.message


async def test_outage_over_9p2000u_carries_the_message(cfs, driver, tmp_path, caplog):
    """What a 9P client sees: Rerror with the driver's words and EIO
    (9P2000.u), Rlerror EIO (9P2000.L); never "internal error", no traceback."""
    async with trio.open_nursery() as nursery:
        op = (await nursery.start(Server(cfs).serve, f"unix!{tmp_path}/op.sock"))[0]
        for version in ("9P2000.u", "9P2000.L"):
            driver.fail_next("list_images", "openstack: list images: HTTP 503 Service Unavailable")
            cfs.catalog._lists["images"] = type(cfs.catalog._lists["images"])()  # forget the listing
            async with open_client(op, version=version) as c:
                with pytest.raises(FsError) as e:
                    await c.listdir("images")
                assert e.value.errno == errno.EIO
                if version == "9P2000.u":
                    assert "HTTP 503 Service Unavailable" in e.value.message
                assert await c.listdir("proc") == ["1"]
        nursery.cancel_scope.cancel()
    assert not [r for r in caplog.records if r.exc_info or "internal error" in r.getMessage()]


async def test_a_listing_fetched_across_a_network_create_is_not_kept(cfs, driver):
    """A fetch of /net that began before a network was created (its answer
    predates the network) is not stored as fresh: the network is listed at
    once."""
    from cloudfs.drivers.base import Network

    entered, go = trio.Event(), trio.Event()
    real = driver.list_networks

    async def slow():
        got = await real()
        entered.set()
        await go.wait()
        return got

    driver.list_networks = slow
    root = await cfs.attach("", "")
    async with trio.open_nursery() as n:
        n.start_soon(ls, root, "/net")
        await entered.wait()
        driver.list_networks = real
        # what create_network does once the cloud made it
        driver.networks["lab"] = Network("net-lab", "lab", "10.9.0.0/24", "active")
        cfs.catalog.forget("networks")
        go.set()
    assert await ls(root, "/net") == ["user", "lab"]
