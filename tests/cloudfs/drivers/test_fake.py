"""cloudfs.drivers.fake: the in-memory compute driver, and the driver
contract it shares with the real ones (create is find-or-create by
deployment + pid; other deployments' servers are never touched)."""

import errno

import pytest

from cloudfs.drivers.base import META_DEPLOYMENT, META_PID, META_PPID, META_ROOT, DriverError, NotFound, ServerSpec
from cloudfs.drivers.fake import FakeDriver
from ninep.errors import FsError

DEP = "0123456789abcdef0123456789abcdef"


def bound(deployment: str = DEP) -> FakeDriver:
    d = FakeDriver()
    d.bind(deployment, "/cloudfs/test")
    return d


async def test_lifecycle():
    d = bound()
    spec = ServerSpec(pid=7, ppid=1, name="web", image="tiny", flavor="m1.tiny", networks=("user",),
                      userdata=b"ud", secret="s" * 32)
    assert await d.find(7) == []
    s = await d.create(spec)
    assert d.metadata[s.id] == {META_DEPLOYMENT: DEP, META_PID: "7", META_PPID: "1", META_ROOT: "/cloudfs/test"}
    assert d.secrets[s.id] == "s" * 32
    assert await d.find(7) == [s] and await d.find(8) == []
    assert s.status == "running" and s.addresses == ("10.0.0.10",) and d.userdata[s.id] == b"ud"
    assert (await d.stop(s.id)).status == "stopped"
    assert (await d.status(s.id)).status == "stopped"
    assert (await d.start(s.id)).status == "running"
    r = await d.rebuild(s.id, "alpine", b"new")
    assert r.id == s.id and r.addresses == s.addresses and d.userdata[s.id] == b"new"
    await d.delete(s.id)
    await d.delete(s.id)  # idempotent
    assert await d.find(7) == []
    with pytest.raises(NotFound):
        await d.status(s.id)
    assert [c[0] for c in d.calls] == ["create", "stop", "start", "rebuild", "delete", "delete"]


async def test_create_is_find_or_create_by_pid():
    d = bound()
    first = await d.create(ServerSpec(pid=7, ppid=1, name="a", image="tiny"))
    again = await d.create(ServerSpec(pid=7, ppid=1, name="a", image="tiny"))
    assert again == first and [c[0] for c in d.calls] == ["create"]
    assert (await d.create(ServerSpec(pid=8, ppid=1, name="b", image="tiny"))).id != first.id


async def test_another_deployments_servers_are_never_touched():
    """Two deployments on one cloud (both named /cloudfs/default, say):
    neither finds, adopts, powers, rebuilds nor deletes the other's servers."""
    mine, theirs = bound(DEP), FakeDriver()
    theirs.bind("f" * 32)
    theirs.servers, theirs.metadata = mine.servers, mine.metadata  # one cloud
    s = await theirs.create(ServerSpec(pid=2, ppid=1, name="theirs", image="tiny"))
    assert await mine.find(2) == []
    adopted = await mine.create(ServerSpec(pid=2, ppid=1, name="mine", image="tiny"))
    assert adopted.id != s.id
    for call in (mine.status(s.id), mine.stop(s.id), mine.start(s.id), mine.rebuild(s.id, "tiny", b""),
                 mine.delete(s.id)):
        with pytest.raises(NotFound):
            await call
    assert s.id in mine.servers and (await theirs.status(s.id)).status == "running"


async def test_an_unbound_driver_makes_nothing():
    with pytest.raises(DriverError, match="no deployment"):
        await FakeDriver().create(ServerSpec(pid=2, ppid=1, name="x", image="tiny"))
    d = bound()
    with pytest.raises(ValueError):
        d.bind("e" * 32)
    d.bind(DEP)  # the same deployment again is fine


async def test_validation_and_failures():
    d = bound()
    for pid, image, flavor, nets in [(2, "nope", "m1.tiny", ()), (3, "tiny", "huge", ()),
                                     (4, "tiny", "m1.tiny", ("nonet",))]:
        with pytest.raises(NotFound) as e:
            await d.create(ServerSpec(pid=pid, ppid=1, name="x", image=image, flavor=flavor, networks=nets))
        assert e.value.errno == errno.ENOENT and isinstance(e.value, FsError)
    d.fail_next("create", "boom")
    with pytest.raises(DriverError, match="boom") as e:
        await d.create(ServerSpec(pid=5, ppid=1, name="x", image="tiny"))
    assert e.value.errno == errno.EIO and str(e.value) == "boom"
    await d.create(ServerSpec(pid=5, ppid=1, name="x", image="tiny"))  # only the next call failed


async def test_listings_and_networks():
    d = FakeDriver()
    assert [i.name for i in await d.list_images()] == ["tiny", "alpine"]
    assert await d.list_flavors() == ["m1.tiny", "m1.small"]
    n = await d.create_network("lab")
    assert n.cidr == "10.1.0.0/24" and n.status == "active"
    assert (await d.create_network("lab2", "192.168.5.0/24")).cidr == "192.168.5.0/24"
    with pytest.raises(DriverError):
        await d.create_network("lab")
    with pytest.raises(DriverError):
        await d.create_network("bad", "not-a-cidr")
    assert [x.name for x in await d.list_networks()] == ["user", "lab", "lab2"]
    assert d.listings == {"list_images": 1, "list_flavors": 1, "list_networks": 1}
