"""cloudfs.drivers.fake: the in-memory compute driver."""

import pytest

from cloudfs.drivers.base import DriverError, NotFound
from cloudfs.drivers.fake import FakeDriver


async def test_lifecycle():
    d = FakeDriver()
    tags = {"cloudfs-deployment": "/d", "cloudfs-pid": "7", "cloudfs-ppid": "1"}
    assert await d.find(tags) is None
    s = await d.create("web", "tiny", "m1.tiny", ["user"], b"ud", metadata=tags)
    assert await d.find({"cloudfs-deployment": "/d", "cloudfs-pid": "7"}) == s
    assert await d.find({"cloudfs-deployment": "/d", "cloudfs-pid": "8"}) is None
    assert s.status == "running" and s.addresses == ("10.0.0.10",) and d.userdata[s.id] == b"ud"
    assert (await d.stop(s.id)).status == "stopped"
    assert (await d.status(s.id)).status == "stopped"
    assert (await d.start(s.id)).status == "running"
    r = await d.rebuild(s.id, "alpine", b"new")
    assert r.id == s.id and r.addresses == s.addresses and d.userdata[s.id] == b"new"
    await d.delete(s.id)
    await d.delete(s.id)  # idempotent
    assert await d.find(tags) is None
    with pytest.raises(NotFound):
        await d.status(s.id)
    assert [c[0] for c in d.calls] == ["create", "stop", "start", "rebuild", "delete", "delete"]


async def test_validation_and_failures():
    d = FakeDriver()
    for args in [("x", "nope", "m1.tiny", []), ("x", "tiny", "huge", []), ("x", "tiny", "m1.tiny", ["nonet"])]:
        with pytest.raises(NotFound):
            await d.create(*args, b"", metadata={})
    d.fail_next("create", "boom")
    with pytest.raises(DriverError, match="boom"):
        await d.create("x", "tiny", "m1.tiny", [], b"", metadata={})
    await d.create("x", "tiny", "m1.tiny", [], b"", metadata={})  # only the next call failed


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
