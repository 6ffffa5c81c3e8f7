"""cloudfs.namespace: every file and command of the tree, through the
ninep.fs interface, with one daemon on a real ZooKeeper and the fake driver."""

import errno
import os

import pytest
import trio

from cloudfs import tree
from ninep.errors import FsError
from ninep.fs import SetAttr
from tests.cloudfs.fsops import fails, cat, ctl, echo, eventually, ls, state_is, status, vm, walk


@pytest.fixture
async def root(cfs):
    return await cfs.attach("glenda", "")


# -- the root and /proc ------------------------------------------------------

async def test_root_listing_and_attrs(root):
    assert await ls(root, "/") == ["proc", "images", "net", "hosts"]
    a = await root.getattr()
    assert a.qid.is_dir and a.mode == tree.mode_of(tree.ROOT)
    await fails(errno.ENOENT, root.walk("nope"))


async def test_init_is_pid_1(root):
    assert await ls(root, "/proc") == ["1"]
    st = await status(root, 1)
    assert st["pid"] == "1" and st["ppid"] == "0" and st["name"] == "init"
    assert st["image"] == "-" and st["state"] == "running"
    assert "error" not in st


async def test_proc_pid_dir(root):
    assert await ls(root, "/proc/1") == ["ctl", "status", "children", "userdata", "env", "wait", "limits", "stats", "console",
                                         "note", "notepg", "pipe"]
    await fails(errno.ENOENT, walk(root, "/proc/99"))
    await fails(errno.ENOENT, walk(root, "/proc/01"))
    await fails(errno.ENOENT, walk(root, "/proc/x"))
    await fails(errno.ENOENT, walk(root, "/proc/1/nope"))
    await fails(errno.ENOTDIR, walk(root, "/proc/1/status/x"))


async def test_qids_unique_and_stable(root):
    pid = int(await ctl(root, 1, "fork"))
    await echo(root, f"/proc/{pid}/env/a", "1")
    paths = ["/", "/proc", "/images", "/net", "/images/tiny", "/net/user", "/proc/1",
             f"/proc/{pid}", f"/proc/{pid}/env/a", f"/proc/{pid}/env/b"]
    paths += [f"/proc/{p}/{f}" for p in (1, pid) for f, _ in tree.PID_FILES]
    qids = [(await walk(root, p)).qid() for p in paths]
    assert len({q.path for q in qids}) == len(paths)
    assert [(await walk(root, p)).qid() for p in paths] == qids
    assert all(q.version == 0 for q in qids)
    a = await (await walk(root, f"/proc/{pid}/status")).getattr()
    assert a.size == 0 and not a.qid.is_dir


async def test_modes_follow_tree(root):
    for path, kind in [("/proc/1/ctl", tree.CTL), ("/proc/1/status", tree.STATUS),
                       ("/proc/1/env", tree.ENV), ("/proc/1/env/k", tree.ENVKEY),
                       ("/proc/1/wait", tree.WAIT), ("/net", tree.NET)]:
        assert (await (await walk(root, path)).getattr()).mode == tree.mode_of(kind)


async def test_read_only_files_refuse_writes(root):
    for path in ["/proc/1/status", "/proc/1/children", "/proc/1/wait", "/images/tiny", "/net/user"]:
        await fails(errno.EACCES, (await walk(root, path)).open(os.O_WRONLY))
    await fails(errno.EISDIR, (await walk(root, "/proc")).open(os.O_WRONLY))
    await fails(errno.EPERM, (await walk(root, "/proc/1/status")).setattr(SetAttr(mode=0o777)))


# -- ctl: fork ----------------------------------------------------------------

async def test_fork_init_gives_new_child(root):
    out = await ctl(root, 1, "fork")
    pid = int(out)
    assert out == f"{pid}\n".encode()
    assert await ls(root, "/proc") == ["1", str(pid)]
    assert (await cat(root, "/proc/1/children")).decode().splitlines()[-1] == str(pid)
    st = await status(root, pid)
    assert st["state"] == "new" and st["ppid"] == "1" and st["image"] == "-"
    assert await cat(root, f"/proc/{pid}/userdata") == b""


async def test_fork_names_and_pids_increase(root):
    a = int(await ctl(root, 1, "fork name=alpha"))
    b = int(await ctl(root, 1, "fork"))
    assert b > a
    assert (await status(root, a))["name"] == "alpha"


async def test_ctl_result_read_once_then_eof(root):
    f = await (await walk(root, "/proc/1/ctl")).open(os.O_RDWR)
    assert await f.read(0, 100) == b""  # nothing written yet
    await f.write(0, b"fork\n")
    out = await f.read(0, 100)
    assert out.endswith(b"\n") and int(out) > 1
    assert await f.read(len(out), 100) == b""
    assert await f.read(0, 100) == b""  # once
    # reads ignore the offset: a shell reading at its position after the write
    await f.write(0, b"fork\n")
    out2 = await f.read(5, 1)
    out2 += await f.read(6, 100)
    assert int(out2) == int(out) + 1 and await f.read(7, 100) == b""
    await f.release()


async def test_fork_vm_copies_image_and_userdata(root, cfs):
    parent = await vm(root, userdata="hello")
    child = int(await ctl(root, parent, "fork name=copy"))
    st = await state_is(root, child, "running")
    assert st["image"] == "tiny" and st["flavor"] == "m1.tiny" and st["networks"] == "user"
    assert st["ppid"] == str(parent) and st["name"] == "copy"
    assert await cat(root, f"/proc/{child}/userdata") == b"hello"
    assert st["addresses"] != (await status(root, parent))["addresses"]
    assert len(cfs.driver.servers) == 2


# -- ctl: exec -----------------------------------------------------------------

async def test_exec_new_process_boots(root, cfs):
    pid = int(await ctl(root, 1, "fork"))
    await echo(root, f"/proc/{pid}/userdata", "#!/bin/sh\necho hi\n")
    assert await ctl(root, pid, "exec alpine flavor=m1.small net=user name=web") == b""
    st = await state_is(root, pid, "running")
    assert st["image"] == "alpine" and st["flavor"] == "m1.small" and st["name"] == "web"
    assert st["host"] == "fake-host" and st["addresses"].startswith("10.0.0.")
    (sid,) = cfs.driver.servers
    assert cfs.driver.userdata[sid] == b"#!/bin/sh\necho hi\n"


async def test_exec_running_rebuilds_keeping_pid_children_env(root, cfs):
    pid = await vm(root)
    kid = int(await ctl(root, pid, "fork"))
    await echo(root, f"/proc/{pid}/env/k", "v")
    await echo(root, f"/proc/{pid}/userdata", "new-data")
    sid = (await cfs.records.require(pid)).value.vm
    await ctl(root, pid, "exec alpine")

    async def rebuilt():
        return ("rebuild", sid) in cfs.driver.calls and (await status(root, pid))["state"] == "running"

    await eventually(rebuilt)
    st = await status(root, pid)
    assert st["image"] == "alpine" and (await cfs.records.require(pid)).value.vm == sid
    assert cfs.driver.userdata[sid] == b"new-data"
    assert await cat(root, f"/proc/{pid}/children") == f"{kid}\n".encode()
    assert await cat(root, f"/proc/{pid}/env/k") == b"v"


async def test_exec_errors_change_nothing(root):
    pid = int(await ctl(root, 1, "fork"))
    await fails(errno.EINVAL, ctl(root, pid, "exec nosuch"), "unknown image 'nosuch'")
    await fails(errno.EINVAL, ctl(root, pid, "exec tiny flavor=huge"), "unknown flavor 'huge'")
    await fails(errno.EINVAL, ctl(root, pid, "exec tiny net=nonet"), "unknown network 'nonet'")
    await fails(errno.EINVAL, ctl(root, pid, "exec"), "needs an image")
    await fails(errno.EPERM, ctl(root, 1, "exec tiny"), "init")
    assert (await status(root, pid))["state"] == "new"


async def test_unknown_command_einval(root):
    e = await fails(errno.EINVAL, ctl(root, 1, "frok"), "unknown ctl command 'frok'")
    assert "fork" in e.message
    assert await ls(root, "/proc") == ["1"]


async def test_driver_failure_is_error_state(root, cfs):
    cfs.driver.fail_next("create", "no valid host was found")
    pid = int(await ctl(root, 1, "fork"))
    await ctl(root, pid, "exec tiny")
    st = await state_is(root, pid, "error")
    assert st["error"] == "no valid host was found"
    await ctl(root, pid, "exec tiny")  # a new exec retries
    assert "error" not in await state_is(root, pid, "running")


# -- ctl: stop, start, kill --------------------------------------------------------

async def test_stop_start(root, cfs):
    pid = await vm(root)
    await ctl(root, pid, "stop")
    await state_is(root, pid, "stopped")
    sid = (await cfs.records.require(pid)).value.vm
    assert cfs.driver.servers[sid].status == "stopped"
    await ctl(root, pid, "start")
    await state_is(root, pid, "running")
    assert cfs.driver.servers[sid].status == "running"


async def test_stop_start_errors(root):
    pid = int(await ctl(root, 1, "fork"))
    await fails(errno.EINVAL, ctl(root, pid, "stop"), "no image")
    await fails(errno.EINVAL, ctl(root, pid, "start"), "no image")
    await fails(errno.EPERM, ctl(root, 1, "stop"))
    await fails(errno.EINVAL, ctl(root, pid, "stop now"), "no arguments")


async def test_kill_children_first_and_wait_records(root, cfs):
    a = await vm(root)
    b = int(await ctl(root, a, "fork name=b"))
    c = int(await ctl(root, b, "fork name=c"))
    await state_is(root, c, "running")
    sids = {p: (await cfs.records.require(p)).value.vm for p in (a, b, c)}
    await ctl(root, a, "kill")
    line = (await cat(root, "/proc/1/wait")).decode()
    assert line == f"{a} p{a} killed killed\n"
    assert await ls(root, "/proc") == ["1"]
    deletes = [sid for op, sid in cfs.driver.calls if op == "delete"]
    assert deletes == [sids[c], sids[b], sids[a]]
    assert not cfs.driver.servers
    await fails(errno.ENOENT, walk(root, f"/proc/{a}"))
    await fails(errno.EPERM, ctl(root, 1, "kill"), "init")


async def test_kill_new_process(root):
    pid = int(await ctl(root, 1, "fork"))
    await ctl(root, pid, "kill")
    assert await cat(root, "/proc/1/wait") == f"{pid} p{pid} killed killed\n".encode()


async def test_ended_process_files_enoent(root):
    pid = int(await ctl(root, 1, "fork"))
    node = await walk(root, f"/proc/{pid}/status")
    await ctl(root, pid, "kill")
    await cat(root, "/proc/1/wait")
    await fails(errno.ENOENT, node.getattr())
    await fails(errno.ENOENT, node.open(os.O_RDONLY))


# -- status, children, userdata ----------------------------------------------------

async def test_children_lists_ascending(root):
    pids = [int(await ctl(root, 1, "fork")) for _ in range(3)]
    assert await cat(root, "/proc/1/children") == "".join(f"{p}\n" for p in pids).encode()
    assert await cat(root, f"/proc/{pids[0]}/children") == b""


async def test_userdata_write_replaces_and_is_bounded(root):
    pid = int(await ctl(root, 1, "fork"))
    await echo(root, f"/proc/{pid}/userdata", "first version, long\n")
    await echo(root, f"/proc/{pid}/userdata", "second\n")
    assert await cat(root, f"/proc/{pid}/userdata") == b"second\n"
    f = await (await walk(root, f"/proc/{pid}/userdata")).open(os.O_WRONLY)
    assert await f.write(0, b"a" * 40000) == 40000
    assert await f.write(40000, b"b" * 20000) == 20000  # a split write extends
    await fails(errno.EFBIG, f.write(60000, b"c" * 10000), "65536")
    await f.release()
    assert await cat(root, f"/proc/{pid}/userdata") == b"a" * 40000 + b"b" * 20000
    await (await walk(root, f"/proc/{pid}/userdata")).setattr(SetAttr(size=0))
    assert await cat(root, f"/proc/{pid}/userdata") == b""


async def test_status_paged_by_v9fs(root):
    f = await (await walk(root, "/proc/1/status")).open(os.O_RDONLY)
    chunks, off = [], 0
    while c := await f.read(off, 7):
        chunks.append(c)
        off += len(c)
    assert b"".join(chunks).startswith(b"pid 1\nppid 0\n")


# -- env ------------------------------------------------------------------------

async def test_env_set_list_unset(root):
    pid = int(await ctl(root, 1, "fork"))
    assert await ls(root, f"/proc/{pid}/env") == []
    await echo(root, f"/proc/{pid}/env/b", "2\n")
    await echo(root, f"/proc/{pid}/env/a", "1\n")
    assert await ls(root, f"/proc/{pid}/env") == ["a", "b"]
    assert await cat(root, f"/proc/{pid}/env/a") == b"1\n"
    await echo(root, f"/proc/{pid}/env/a", "one\n")
    assert await cat(root, f"/proc/{pid}/env/a") == b"one\n"
    env = await walk(root, f"/proc/{pid}/env")
    await env.unlink("a", False)
    assert await ls(root, f"/proc/{pid}/env") == ["b"]
    await fails(errno.ENOENT, env.unlink("a", False), "not set")


async def test_env_create(root):
    env = await walk(root, "/proc/1/env")
    node, f = await env.create("made", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    await f.write(0, b"x")
    assert await cat(root, "/proc/1/env/made") == b"x"


async def test_env_bad_names(root):
    env = await walk(root, "/proc/1/env")
    await fails(errno.EINVAL, env.walk("a\nb"))
    await fails(errno.ENAMETOOLONG, env.walk("k" * 256))
    await fails(errno.EINVAL, env.walk("bad\udcff"))  # not UTF-8 (a 9P name with surrogate escapes)
    await fails(errno.EINVAL, env.walk("c1\x85"))
    await fails(errno.ENAMETOOLONG, env.walk("é" * 128))  # 256 bytes of UTF-8


async def test_pids_are_ascii(root):
    proc = await walk(root, "/proc")
    for name in ("٠", "١", "²", "1" * 5000, "01", "+1", " 1", "1\udcff"):
        await fails(errno.ENOENT, proc.walk(name))
    net = await walk(root, "/net")
    await fails(errno.EINVAL, net.create("lab\n", 0o644, os.O_RDONLY, 0, 0))


async def test_env_read_blocks_until_set(root, cfs):
    got = []

    async def reader():
        got.append(await cat(root, "/proc/1/env/result"))

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.sleep(0.2)
        assert got == []
        await echo(root, "/proc/1/env/result", "42\n")
    assert got == [b"42\n"]
    assert cfs.store.waiter_count(cfs.layout.proc) == 0


async def test_env_nonblocking_eagain(root):
    await fails(errno.EAGAIN, cat(root, "/proc/1/env/unset", os.O_RDONLY | os.O_NONBLOCK), "not set")


async def test_env_cancelled_read_leaves_no_waiter(root, cfs):
    with trio.move_on_after(0.2) as cs:
        await cat(root, "/proc/1/env/never")
    assert cs.cancelled_caught
    assert cfs.store.waiter_count(cfs.layout.proc) == 0


async def test_env_read_of_ended_process_enoent(root, cfs):
    pid = int(await ctl(root, 1, "fork"))
    got = []

    async def reader():
        with pytest.raises(FsError) as e:
            await cat(root, f"/proc/{pid}/env/never")
        got.append(e.value.errno)

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.sleep(0.2)
        await ctl(root, pid, "kill")
    assert got == [errno.ENOENT]
    assert cfs.store.waiter_count(cfs.layout.proc) == 0


async def test_env_value_bounded(root):
    await fails(errno.EFBIG, echo(root, "/proc/1/env/big", b"x" * (256 * 1024 + 1)))


# -- wait -------------------------------------------------------------------------

async def test_wait_blocks_and_consumes_in_order(root, cfs):
    a = int(await ctl(root, 1, "fork name=a"))
    b = int(await ctl(root, 1, "fork name=b"))
    got = []

    async def waiter():
        got.append(await cat(root, "/proc/1/wait"))

    async with trio.open_nursery() as n:
        n.start_soon(waiter)
        await trio.sleep(0.2)
        assert got == []
        await ctl(root, a, "kill")
    assert got == [f"{a} a killed killed\n".encode()]
    await ctl(root, b, "kill")
    assert await cat(root, "/proc/1/wait") == f"{b} b killed killed\n".encode()
    await fails(errno.EAGAIN, cat(root, "/proc/1/wait", os.O_RDONLY | os.O_NONBLOCK))
    assert cfs.store.waiter_count(cfs.layout.proc) == 0


async def test_wait_read_cancelled_mid_consume_still_returns_its_record(root, cfs, monkeypatch):
    """A flush that lands while the record is being deleted: the read still
    returns that record (the reply goes out before Rflush), so it is never
    consumed and dropped."""
    a = int(await ctl(root, 1, "fork name=a"))
    await ctl(root, a, "kill")
    entered, go = trio.Event(), trio.Event()
    delete = cfs.store.delete

    async def slow_delete(path, version=-1):
        if "/wait/" in path:
            entered.set()
            await go.wait()
        await delete(path, version)

    monkeypatch.setattr(cfs.store, "delete", slow_delete)
    f = await (await walk(root, "/proc/1/wait")).open(os.O_RDONLY)
    got = []

    async def reader(scope_box):
        with trio.CancelScope() as scope:
            scope_box.append(scope)
            got.append(await f.read(0, 4096))  # recorded before any checkpoint
            await trio.sleep_forever()

    box = []
    async with trio.open_nursery() as n:
        n.start_soon(reader, box)
        with trio.fail_after(5):
            await entered.wait()
        box[0].cancel()  # the flush
        await trio.sleep(0.05)
        go.set()
    assert got == [f"{a} a killed killed\n".encode()]
    await fails(errno.EAGAIN, cat(root, "/proc/1/wait", os.O_RDONLY | os.O_NONBLOCK))


async def test_wait_on_vm_parent(root):
    p = await vm(root)
    k = int(await ctl(root, p, "fork name=k"))
    await ctl(root, k, "kill")
    assert await cat(root, f"/proc/{p}/wait") == f"{k} k killed killed\n".encode()


# -- images and net ----------------------------------------------------------------

async def test_images(root):
    assert await ls(root, "/images") == ["tiny", "alpine"]
    text = (await cat(root, "/images/tiny")).decode()
    kv = dict(line.split(" ", 1) for line in text.splitlines())
    assert list(kv) == ["id", "name", "status", "size", "disk_format", "container_format", "checksum", "created"]
    assert kv["name"] == "tiny" and kv["disk_format"] == "qcow2"
    await fails(errno.ENOENT, walk(root, "/images/nope"))


async def test_net_list_and_create(root, cfs):
    assert await ls(root, "/net") == ["user"]
    kv = dict(line.split(" ", 1) for line in (await cat(root, "/net/user")).decode().splitlines())
    assert kv == {"id": "net-user-0001", "name": "user", "cidr": "10.0.0.0/24", "status": "active"}
    net = await walk(root, "/net")
    node, f = await net.create("lab", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    assert (await f.read(0, 1000)).startswith(b"id net-")
    assert await ls(root, "/net") == ["user", "lab"]
    await fails(errno.EEXIST, net.create("lab", 0o644, os.O_CREAT, 0, 0))
    await fails(errno.EINVAL, net.create("bad name", 0o644, os.O_CREAT, 0, 0))
    pid = int(await ctl(root, 1, "fork"))
    await ctl(root, pid, "exec tiny net=lab")
    st = await state_is(root, pid, "running")
    assert st["networks"] == "lab" and st["addresses"].startswith("10.1.0.")
    # rm /net/lab: EBUSY while a VM is on it, the operator's only, ENOENT when gone
    await fails(errno.EBUSY, net.unlink("lab", False))
    await fails(errno.EACCES, (await walk(cfs.view_for(pid), "/net")).unlink("lab", False))
    await ctl(root, pid, "kill")
    await cat(root, "/proc/1/wait")
    await net.unlink("lab", False)
    assert await ls(root, "/net") == ["user"]
    await fails(errno.ENOENT, net.unlink("lab", False))
    await fails(errno.ENOTDIR, net.unlink("user", True))


# -- views ------------------------------------------------------------------------

async def test_proc_self(cfs):
    op = await cfs.attach("", "")
    await fails(errno.ENOENT, walk(op, "/proc/self"), "operator")
    pid = int(await ctl(op, 1, "fork"))
    mine = await cfs.attach("", f"proc/{pid}")
    assert (await status(mine, "self"))["pid"] == str(pid)
    assert (await walk(mine, "/proc/self")).qid() == (await walk(op, f"/proc/{pid}")).qid()
    assert "self" not in await ls(mine, "/proc")
    assert (await status(cfs.view_for(1), "self"))["name"] == "init"
    await fails(errno.ENOENT, cfs.attach("", "proc/999"))
    await fails(errno.ENOENT, cfs.attach("", "bogus"))
