"""cloudfs.reconciler: converging is idempotent; resync writes the backend's
view back (exited servers, power changes made outside cloudfs)."""

import trio

from tests.cloudfs.fsops import cat, ctl, ls, state_is, status, vm


async def test_converge_twice_is_a_no_op(cfs):
    root = await cfs.attach("", "")
    pid = await vm(root)
    before = list(cfs.driver.calls)
    rec, _ = await cfs.table.require(pid)
    await cfs.reconciler.converge(rec)
    await cfs.reconciler.converge(rec)
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
    sid = (await cfs.table.require(p))[0].vm
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
    sid = (await cfs.table.require(pid))[0].vm
    await cfs.driver.stop(sid)  # stopped behind cloudfs's back
    await cfs.reconciler.resync()
    assert (await status(root, pid))["state"] == "stopped"


async def test_resync_runs_periodically(zookeeper, zk_root, driver):
    from cloudfs.namespace import open_cloudfs

    async with open_cloudfs(zookeeper.hosts, driver, zk_root, resync_interval=0.1) as fs:
        root = await fs.attach("", "")
        pid = await vm(root)
        driver.servers.pop((await fs.table.require(pid))[0].vm)  # vanished
        with trio.fail_after(5):
            line = await cat(root, "/proc/1/wait")
        assert line == f"{pid} p{pid} exited server vanished\n".encode()


async def test_create_whose_reply_was_lost_is_adopted_not_duplicated(cfs):
    """A server tagged with this deployment and pid already exists (an earlier
    create went through but its reply, or the daemon, was lost): exec adopts it."""
    root = await cfs.attach("", "")
    pid = int(await ctl(root, 1, "fork"))
    rec, _ = await cfs.table.require(pid)
    earlier = await cfs.driver.create("lost", "tiny", "m1.tiny", ["user"], b"",
                                      metadata=cfs.table.server_tags(rec))
    await ctl(root, pid, "exec tiny")
    await state_is(root, pid, "running")
    assert (await cfs.table.require(pid))[0].vm == earlier.id
    assert [c for c in cfs.driver.calls if c[0] == "create"] == [("create", earlier.id)]
    assert list(cfs.driver.servers) == [earlier.id]


async def test_kill_deletes_a_server_a_lost_create_left_behind(cfs):
    root = await cfs.attach("", "")
    pid = int(await ctl(root, 1, "fork"))
    cfs.driver.fail_next("create", "reply lost")
    await ctl(root, pid, "exec tiny")
    await state_is(root, pid, "error")
    rec, _ = await cfs.table.require(pid)
    assert rec.vm is None
    # the lost create did make a server, tagged with the deployment and pid
    orphan = await cfs.driver.create("x", "tiny", "m1.tiny", ["user"], b"", metadata=cfs.table.server_tags(rec))
    await ctl(root, pid, "kill")
    assert await cat(root, "/proc/1/wait") == f"{pid} p{pid} killed killed\n".encode()
    assert orphan.id not in cfs.driver.servers and ("delete", orphan.id) in cfs.driver.calls


async def test_create_passes_the_process_secret_to_the_driver(cfs):
    from cloudfs.drivers.base import META_SECRET

    root = await cfs.attach("", "")
    pid = await vm(root)
    rec, _ = await cfs.table.require(pid)
    assert len(rec.secret) == 32 and cfs.driver.metadata[rec.vm][META_SECRET] == rec.secret
    assert await cfs.driver.find(cfs.table.server_tags(rec)) is not None  # find ignores the secret


async def test_a_restarted_daemon_watches_the_vms_it_did_not_start(zookeeper, zk_root, driver):
    """Daemon A boots a VM and goes away; daemon B starts fresh on the same
    ZooKeeper root.  When the VM then ends by itself, B notices (it takes
    over the unowned process) and the parent gets the wait record."""
    from cloudfs.namespace import open_cloudfs

    async with open_cloudfs(zookeeper.hosts, driver, zk_root, daemon_id="a") as a:
        pid = await vm(await a.attach("", ""))
        sid = (await a.table.require(pid))[0].vm
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
