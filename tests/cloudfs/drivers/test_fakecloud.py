"""cloudfs.drivers.fakecloud: the fake driver's servers as files, one fake
cloud shared by separate driver instances (separate daemons in the cluster
harness): what one makes, another finds, powers and deletes; other
deployments' servers stay untouched; junk in the directory is skipped."""

import os

import pytest

from cloudfs.drivers.base import META_DEPLOYMENT, META_PID, NotFound, ServerSpec
from cloudfs.drivers.fakecloud import FakeCloudDriver

DEP = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"
SPEC = ServerSpec(pid=7, ppid=1, name="web", image="tiny", userdata=b"ud", secret="s" * 32)


def bound(directory, deployment: str = DEP) -> FakeCloudDriver:
    d = FakeCloudDriver(directory)
    d.bind(deployment, "/cloudfs/test")
    return d


async def test_two_instances_share_one_cloud(tmp_path):
    a, b = bound(tmp_path), bound(tmp_path)
    assert a.scope == b.scope == f"fake-cloud:{tmp_path.resolve()}"
    s = await a.create(SPEC)
    assert s.status == "running" and s.addresses[0].startswith("10.0.0.")
    assert await b.find(7) == [s]
    assert await b.create(SPEC) == s  # find-or-create by (deployment, pid), across instances
    assert (await b.stop(s.id)).status == "stopped"
    assert (await a.status(s.id)).status == "stopped"
    assert (await a.rebuild(s.id, "alpine", b"new", secret="t" * 32)).status == "running"
    assert (await b.stats(s.id)).memory_bytes == 256 << 20
    assert b"web" in await b.console(s.id, 100)
    a.exit(s.id, "poweroff")
    assert (await b.status(s.id)).status == "exited" and (await b.status(s.id)).message == "poweroff"
    await b.delete(s.id)
    await b.delete(s.id)  # idempotent
    assert await a.find(7) == []
    with pytest.raises(NotFound):
        await a.status(s.id)
    assert a.calls == [("create", s.id), ("rebuild", s.id)]


async def test_other_deployments_and_junk(tmp_path):
    mine, theirs = bound(tmp_path), bound(tmp_path, OTHER)
    s = await theirs.create(SPEC)
    assert await mine.find(7) == []
    with pytest.raises(NotFound):  # NotOurs is a NotFound
        await mine.stop(s.id)
    with pytest.raises(NotFound):
        await mine.delete(s.id)
    with pytest.raises(NotFound):
        await mine.status("../../etc/passwd")
    (tmp_path / "servers" / "0badc0de.json").write_text("{not json")
    (tmp_path / "servers" / ".tmp-0123").write_text("{}")
    (tmp_path / "servers" / "abc.json").write_text('{"id": "other"}')
    (tmp_path / "servers" / "abd.json").write_text('{"id": "abd", "metadata": {}}')  # fields missing
    mine_s = await mine.create(SPEC)
    assert await mine.find(7) == [mine_s]
    listed = {srv.id: md for srv, md in mine.servers_on_disk()}
    assert set(listed) == {s.id, mine_s.id}
    assert listed[s.id][META_DEPLOYMENT] == OTHER and listed[mine_s.id][META_PID] == "7"
    assert sorted(os.listdir(tmp_path / "servers")) == sorted(
        [f"{s.id}.json", f"{mine_s.id}.json", "0badc0de.json", ".tmp-0123", "abc.json", "abd.json"])


async def test_settings(tmp_path):
    (tmp_path / "settings.json").write_text('{"create_seconds": 0.2}')
    d = bound(tmp_path)
    assert d.create_seconds == 0.2
    import trio
    t = trio.current_time()
    await d.create(SPEC)
    assert trio.current_time() - t >= 0.2
    for bad in ['{"create_seconds": -1}', '{"create_seconds": "1"}', "[", '{"create_seconds": true}']:
        (tmp_path / "settings.json").write_text(bad)
        with pytest.raises(ValueError):
            FakeCloudDriver(tmp_path)


async def test_a_power_change_racing_a_delete_does_not_bring_the_server_back(tmp_path):
    """The delete leaves a tombstone before it unlinks; a change that read
    the file before the delete and renames its copy after it undoes itself."""
    a, b = bound(tmp_path), bound(tmp_path)
    s = await a.create(SPEC)
    doc = a._ours_doc(s.id)  # a's stop has read the file ...
    await b.delete(s.id)     # ... b deletes the server ...
    a._write(doc)            # ... a's rename lands after the unlink
    with pytest.raises(NotFound):
        await a.stop(s.id)   # a change now finds the tombstone and undoes its write
    assert await b.find(7) == []
