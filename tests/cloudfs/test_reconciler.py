"""cloudfs.reconciler: converging is idempotent; resync writes the backend's
view back (exited servers, power changes made outside cloudfs)."""

import trio

from cloudfs.drivers.base import Server, ServerSpec
from tests.cloudfs.fsops import cat, ctl, ls, state_is, status, vm


async def test_converge_twice_is_a_no_op(cfs):
    root = await cfs.attach("", "")
    pid = await vm(root)
    before = list(cfs.driver.calls)
    assert await cfs.reconciler.converge(pid)
    assert await cfs.reconciler.converge(pid)
    assert cfs.driver.calls == before
    assert (await status(root, pid))["state"] == "running"


async def test_rebuild_failure_is_error_state(cfs):
    root = await cfs.attach("", "")
    pid = await vm(root)
    cfs.driver.fail_next("rebuild", "image is corrupt")
    await ctl(root, pid, "exec alpine")
    st = await state_is(root, pid, "error")
    assert st["error"] == "image is corrupt"
    await ctl(root, pid, "kill")  # an errored process can still be killed
    assert await cat(root, "/proc/1/wait") == f"{pid} p{pid} killed killed\n".encode()


async def test_stop_failure_is_error_state(cfs):
    root = await cfs.attach("", "")
    pid = await vm(root)
    cfs.driver.fail_next("stop", "hypervisor busy")
    await ctl(root, pid, "stop")
    assert (await state_is(root, pid, "error"))["error"] == "hypervisor busy"


async def test_resync_exited_server_reparents_children(cfs):
    root = await cfs.attach("", "")
    p = await vm(root)
    k = int(await ctl(root, p, "fork name=kid"))
    await state_is(root, k, "running")
    sid = (await cfs.records.require(p)).value.vm
    cfs.driver.exit(sid, "guest powered off")
    await cfs.reconciler.resync()
    assert await cat(root, "/proc/1/wait") == f"{p} p{p} exited guest powered off\n".encode()
    assert await ls(root, "/proc") == ["1", str(k)]
    assert (await status(root, k))["ppid"] == "1"
    assert await cat(root, "/proc/1/children") == f"{k}\n".encode()
    assert sid not in cfs.driver.servers


async def test_resync_records_outside_power_change(cfs):
    root = await cfs.attach("", "")
    pid = await vm(root)
    sid = (await cfs.records.require(pid)).value.vm
    await cfs.driver.stop(sid)  # stopped behind cloudfs's back
    await cfs.reconciler.resync()
    st = await status(root, pid)
    assert (st["state"], st["desired"]) == ("stopped", "stopped")  # accepted, as Nova's power sync does
    await cfs.reconciler.resync()
    assert not [c for c in cfs.driver.calls if c[0] == "start"]  # not fought
    await ctl(root, pid, "start")
    await state_is(root, pid, "running")


async def test_resync_records_a_backend_error(cfs):
    from cloudfs.drivers.base import Server

    root = await cfs.attach("", "")
    pid = await vm(root)
    sid = (await cfs.records.require(pid)).value.vm
    s = cfs.driver.servers[sid]
    cfs.driver.servers[sid] = Server(s.id, s.name, "error", s.host, s.addresses, "host went away")
    await cfs.reconciler.resync()
    st = await status(root, pid)
    assert (st["state"], st["error"]) == ("error", "host went away")
    calls = list(cfs.driver.calls)
    await cfs.reconciler.resync()  # error is sticky: nothing more is tried
    assert cfs.driver.calls == calls


async def test_work_item_names_it_did_not_write_are_ignored(cfs):
    root = await cfs.attach("", "")
    for junk in ("garbage", "x-1", "07-0000000001", "-1"):
        await cfs.store.create(f"{cfs.layout.pending}/{junk}", b"")
    pid = await vm(root)  # the reconciler goes on
    assert (await status(root, pid))["state"] == "running"


async def test_a_pid_it_no_longer_owns_is_left_to_its_owner(cfs):
    root = await cfs.attach("", "")
    pid = await vm(root)
    await cfs.reconciler.owners.release(pid)
    calls = list(cfs.driver.calls)
    await ctl(root, pid, "stop")  # this daemon takes it again for the work item
    await state_is(root, pid, "stopped")
    cfs.reconciler.owners.forget()  # as after a lost session
    assert await cfs.reconciler.converge(pid) is False
    assert cfs.driver.calls == calls + [("stop", (await cfs.records.require(pid)).value.vm)]


async def test_resync_runs_periodically(zookeeper, zk_root, driver):
    from cloudfs.namespace import open_cloudfs

    async with open_cloudfs(zookeeper.hosts, driver, zk_root, resync_interval=0.1) as fs:
        root = await fs.attach("", "")
        pid = await vm(root)
        driver.servers.pop((await fs.records.require(pid)).value.vm)  # vanished
        with trio.fail_after(5):
            line = await cat(root, "/proc/1/wait")
        assert line == f"{pid} p{pid} exited server vanished\n".encode()


async def test_create_whose_reply_was_lost_is_adopted_not_duplicated(cfs):
    """A server tagged with this deployment and pid already exists (an earlier
    create went through but its reply, or the daemon, was lost): exec adopts it."""
    root = await cfs.attach("", "")
    pid = int(await ctl(root, 1, "fork"))
    earlier = await cfs.driver.create(ServerSpec(pid=pid, ppid=1, name="lost", image="tiny"))
    await ctl(root, pid, "exec tiny")
    await state_is(root, pid, "running")
    assert (await cfs.records.require(pid)).value.vm == earlier.id
    assert [c for c in cfs.driver.calls if c[0] == "create"] == [("create", earlier.id)]
    assert list(cfs.driver.servers) == [earlier.id]


async def test_kill_deletes_a_server_a_lost_create_left_behind(cfs):
    root = await cfs.attach("", "")
    pid = int(await ctl(root, 1, "fork"))
    cfs.driver.fail_next("create", "reply lost")
    await ctl(root, pid, "exec tiny")
    await state_is(root, pid, "error")
    rec = (await cfs.records.require(pid)).value
    assert rec.vm is None
    # the lost create did make a server, tagged with the deployment and pid
    orphan = await cfs.driver.create(ServerSpec(pid=pid, ppid=1, name="x", image="tiny"))
    await ctl(root, pid, "kill")
    assert await cat(root, "/proc/1/wait") == f"{pid} p{pid} killed killed\n".encode()
    assert orphan.id not in cfs.driver.servers and ("delete", orphan.id) in cfs.driver.calls


async def test_create_passes_the_process_secret_to_the_driver(cfs):
    from cloudfs.drivers.base import META_SECRET

    root = await cfs.attach("", "")
    pid = await vm(root)
    rec = (await cfs.records.require(pid)).value
    assert len(rec.secret) == 32 and cfs.driver.secrets[rec.vm] == rec.secret
    assert META_SECRET not in cfs.driver.metadata[rec.vm]  # for the guest only, never a tag
    assert [s.id for s in await cfs.driver.find(pid)] == [rec.vm]


async def test_a_restarted_daemon_watches_the_vms_it_did_not_start(zookeeper, zk_root, driver):
    """Daemon A boots a VM and goes away; daemon B starts fresh on the same
    ZooKeeper root.  When the VM then ends by itself, B notices (it takes
    over the unowned process) and the parent gets the wait record."""
    from cloudfs.namespace import open_cloudfs

    async with open_cloudfs(zookeeper.hosts, driver, zk_root, daemon_id="a") as a:
        pid = await vm(await a.attach("", ""))
        sid = (await a.records.require(pid)).value.vm
    async with open_cloudfs(zookeeper.hosts, driver, zk_root, daemon_id="b", resync_interval=0.1) as b:
        root = await b.attach("", "")
        with trio.fail_after(5):
            while pid not in b.reconciler.owned:
                await trio.sleep(0.05)
        driver.exit(sid, "guest powered off")
        with trio.fail_after(5):
            line = await cat(root, "/proc/1/wait")
        assert line == f"{pid} p{pid} exited guest powered off\n".encode()


async def test_work_left_by_a_failing_driver_is_retried(zookeeper, zk_root, driver):
    """A driver call that raises something unexpected neither stops the
    daemon nor strands the work: the periodic rescan tries again."""
    from cloudfs.namespace import open_cloudfs

    real_create = driver.create
    calls = []

    async def flaky_create(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("driver bug")
        return await real_create(*a, **kw)

    driver.create = flaky_create
    async with open_cloudfs(zookeeper.hosts, driver, zk_root, resync_interval=0.2) as fs:
        root = await fs.attach("", "")
        pid = int(await ctl(root, 1, "fork"))
        await ctl(root, pid, "exec tiny")
        await state_is(root, pid, "running")
        assert len(calls) == 2


async def test_a_rebuild_rotates_the_secret_only_when_it_succeeds(cfs):
    root = await cfs.attach("", "")
    pid = await vm(root)
    first = (await cfs.records.require(pid)).value.secret
    cfs.driver.fail_next("rebuild", "quota exceeded")
    await ctl(root, pid, "exec alpine")
    await state_is(root, pid, "error")
    assert (await cfs.records.require(pid)).value.secret == first  # the old guest keeps attaching
    await ctl(root, pid, "exec tiny")
    await state_is(root, pid, "running")
    rec = (await cfs.records.require(pid)).value
    assert rec.secret != first and cfs.driver.secrets[rec.vm] == rec.secret


async def test_an_end_deletes_a_duplicate_beside_the_recorded_server(cfs):
    """A create fenced too late (its daemon paused mid-create past its
    session, another daemon recorded its own server, the late record write
    failed) leaves a second server tagged with the pid: when the process
    ends, killed or exited, both go.  (Found by the cluster harness,
    daemon-pause.)"""
    root = await cfs.attach("", "")

    def duplicate(pid: int) -> Server:  # as a paused daemon's create leaves (create itself would adopt)
        late = Server(f"late{pid:04d}", "late", "running", "fake-host")
        cfs.driver.servers[late.id] = late
        cfs.driver.metadata[late.id] = cfs.driver.metadata_for(ServerSpec(pid=pid, ppid=1, name="l", image="tiny"))
        return late

    pid = await vm(root)
    recorded = (await cfs.records.require(pid)).value.vm
    late = duplicate(pid)
    assert len(await cfs.driver.find(pid)) == 2
    await ctl(root, pid, "kill")
    assert await cat(root, "/proc/1/wait") == f"{pid} p{pid} killed killed\n".encode()
    assert recorded not in cfs.driver.servers and late.id not in cfs.driver.servers

    pid = await vm(root)
    recorded = (await cfs.records.require(pid)).value.vm
    late = duplicate(pid)
    cfs.driver.exit(recorded, "guest powered off")
    await cfs.reconciler.resync()
    assert await cat(root, "/proc/1/wait") == f"{pid} p{pid} exited guest powered off\n".encode()
    assert recorded not in cfs.driver.servers and late.id not in cfs.driver.servers


async def test_an_end_keeps_its_work_items_until_its_last_multi(cfs, zookeeper):
    """Ending a process clears its env, waits and pipes first and removes
    the rest in one last multi; its work items go only in that multi, so an
    end stopped half way (the session lost between the steps) still has
    work that brings a daemon back to finish it.  (Found by the cluster
    harness, daemon-partition: the items went first, and the process stayed
    "running" with its server deleted.)"""
    from kazoo.client import KazooClient

    from cloudfs.process import State

    root = await cfs.attach("", "")
    pid = int(await ctl(root, 1, "fork"))
    L = cfs.layout
    other = KazooClient(zookeeper.hosts)  # another daemon owns the pid: this one's reconciler keeps off
    await trio.to_thread.run_sync(other.start)
    try:
        await trio.to_thread.run_sync(lambda: other.create(L.owner(pid), b"someone-else", ephemeral=True))
        item = await cfs.store.create(L.pending_prefix(pid), b"", sequence=True)
        await cfs.exits._clear(pid)  # the first step alone, as when the session dies after it
        assert await cfs.store.exists(item) is not None
        assert await cfs.exits.end(pid, State.KILLED, "killed")
        assert await cfs.store.exists(item) is None
    finally:
        await trio.to_thread.run_sync(other.stop)


async def test_unconfirmed_creates_are_settled_once(cfs):
    """A create whose record write failed (the session went) is kept in
    ``unconfirmed``; reconnection and resync both settle them, possibly at
    once: the duplicate is deleted once and the daemon goes on.  (The
    cluster harness's daemon-pause once killed a daemon with a KeyError
    here.)"""
    root = await cfs.attach("", "")
    pid = await vm(root)
    recorded = (await cfs.records.require(pid)).value.vm
    late = Server("late0002", "late", "running", "fake-host")
    cfs.driver.servers[late.id] = late
    cfs.driver.metadata[late.id] = cfs.driver.metadata_for(ServerSpec(pid=pid, ppid=1, name="l", image="tiny"))
    kept = int(await ctl(root, 1, "fork"))  # a process that records no server yet keeps its unconfirmed one
    cfs.reconciler.unconfirmed.update({pid: late.id, kept: "adoptme"})
    async with trio.open_nursery() as n:
        n.start_soon(cfs.reconciler._settle_now)
        n.start_soon(cfs.reconciler.resync)
    assert cfs.reconciler.unconfirmed == {}
    assert late.id not in cfs.driver.servers and recorded in cfs.driver.servers
    assert [c for c in cfs.driver.calls if c == ("delete", late.id)] == [("delete", late.id)]
