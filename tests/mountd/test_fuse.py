"""mountd.fuse through the kernel's FUSE, via ``cloudfs import``.

Each test serves a :class:`ninep.memfs.MemFS` with our 9P server inside the
test's trio loop, runs ``python -m mountd.cli import tcp!127.0.0.1!PORT MNT``
as a child process (RemoteFS over ninep.client, mounted by mountd.fuse), waits
for the mount and then uses plain ``os`` calls and real ``ls``, ``cat``,
``echo``, ``grep``, ``tail`` processes.

The 9P server runs in this very thread, so every call that touches the mount
goes through ``trio.to_thread`` or a child process (a blocking call here
would deadlock against our own server).  Every child (the importer, readers)
is killed and the mount removed in ``finally`` blocks, with ``fusermount3 -u
-z`` as the last resort.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from mountd.fuse import is_stale_mount
from ninep.client import open_client
from ninep.errors import FsError
from ninep.limits import Limits
from ninep.memfs import MemFS
from tests.ninep.wire import serving

REPO = Path(__file__).resolve().parents[2]
MOUNT_TIMEOUT = 15.0


def _sync(fn, *args):
    """Run a blocking call on the mount in a worker thread."""
    return trio.to_thread.run_sync(fn, *args)


async def _eventually(pred, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``pred`` (sync, run in this thread) until true, or fail."""
    deadline = trio.current_time() + timeout
    while not pred():
        if trio.current_time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await trio.sleep(0.02)


def _live_mount(mnt: str) -> bool:
    """A mount point whose daemon answers (statvfs reaches it; a stale mount says ENOTCONN)."""
    if not os.path.ismount(mnt):
        return False
    try:
        os.statvfs(mnt)
    except OSError:
        return False
    return True


async def _mounted(mnt: Path) -> bool:
    return await _sync(_live_mount, str(mnt))


def _force_unmount(mnt: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


class Import:
    """One ``cloudfs import`` child process and its mount point."""

    def __init__(self, addr: str, mnt: Path, log: Path):
        self.addr, self.mnt, self.log = addr, mnt, log
        self.proc: trio.Process | None = None

    async def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "mountd.cli", "import", self.addr, str(self.mnt)],
                cwd=str(REPO), stdout=out, stderr=out,
            )
        deadline = trio.current_time() + MOUNT_TIMEOUT
        while not await _mounted(self.mnt):
            if self.proc.poll() is not None:
                raise AssertionError(f"import exited with {self.proc.returncode}: {self.log.read_text()}")
            if trio.current_time() > deadline:
                raise AssertionError(f"no mount after {MOUNT_TIMEOUT} s: {self.log.read_text()}")
            await trio.sleep(0.05)

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 5 s; returns the exit status."""
        p = self.proc
        if p is None:
            return None
        if p.returncode is None:
            p.send_signal(signal.SIGTERM)
            with trio.move_on_after(5):
                await p.wait()
            if p.returncode is None:
                p.kill()
                await p.wait()
        return p.returncode


@contextlib.asynccontextmanager
async def imported(tmp_path: Path):
    """Serve a MemFS and mount it with ``cloudfs import``; yields (fs, mnt, addr, Import).
    The server lets the one connection keep 1,024 requests outstanding, each
    with a reply budget of an msize (the importer carries every blocked
    reader of the mount on it, and each blocked Tread reserves its reply).

    Children registered in ``children`` (a list attribute on the Import) are
    killed on the way out, before the importer is stopped.
    """
    fs = MemFS()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    async with serving(fs, limits=Limits(max_outstanding=1024, max_queued_msizes=1024)) as (_server, addr):
        imp = Import(addr, mnt, tmp_path / "import.log")
        imp.children = []  # type: ignore[attr-defined]
        try:
            await imp.start()
            yield fs, mnt, addr, imp
        finally:
            with trio.CancelScope(shield=True):
                for c in imp.children:  # type: ignore[attr-defined]
                    if c.returncode is None:
                        c.kill()
                        await c.wait()
                await imp.stop()
                if await _sync(os.path.ismount, str(mnt)) or await _sync(is_stale_mount, str(mnt)):
                    await _sync(_force_unmount, mnt)


async def sh(cmd: str, timeout: float = 10.0, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``sh -c cmd`` (real processes against the mount)."""
    with trio.fail_after(timeout):
        return await trio.run_process(["sh", "-c", cmd], capture_stdout=True, capture_stderr=True, check=check)


async def spawn(imp: Import, args: list[str], **kw) -> trio.Process:
    p = await trio.lowlevel.open_process(args, **kw)
    imp.children.append(p)  # type: ignore[attr-defined]
    return p


# --------------------------------------------------------------------------


async def test_files_and_directories(tmp_path):
    async with imported(tmp_path) as (fs, mnt, addr, imp):
        m = str(mnt)
        await sh(f"echo hello > {m}/greeting && mkdir {m}/dir && echo one > {m}/dir/a && echo two >> {m}/dir/a")
        assert (await sh(f"cat {m}/greeting")).stdout == b"hello\n"
        assert (await sh(f"ls {m}")).stdout.split() == [b"dir", b"greeting", b"wait"]
        assert (await sh(f"grep two {m}/dir/a")).stdout == b"two\n"
        assert (await sh(f"tail -n 1 {m}/dir/a")).stdout == b"two\n"
        assert bytes(fs.root.children["dir"].children["a"].data) == b"one\ntwo\n"

        st = await _sync(os.stat, f"{m}/dir/a")
        assert st.st_size == 8 and st.st_mode & 0o170000 == 0o100000
        assert (await _sync(os.stat, f"{m}/dir")).st_mode & 0o170000 == 0o040000
        assert sorted(await _sync(os.listdir, f"{m}/dir")) == ["a"]

        # pwrite at an offset, truncate, rename, then removals
        def edit():
            fd = os.open(f"{m}/dir/a", os.O_RDWR)
            try:
                os.pwrite(fd, b"ONE", 0)
                return os.pread(fd, 100, 0)
            finally:
                os.close(fd)
        assert await edit_and_check(edit) == b"ONE\ntwo\n"
        await _sync(os.truncate, f"{m}/dir/a", 3)
        assert (await sh(f"cat {m}/dir/a")).stdout == b"ONE"
        await _sync(os.rename, f"{m}/dir/a", f"{m}/b")
        assert sorted(await _sync(os.listdir, m)) == ["b", "dir", "greeting", "wait"]
        await sh(f"rm {m}/b {m}/greeting && rmdir {m}/dir")
        assert sorted(fs.root.children) == ["wait"]

        # errno mapping: the FsError errno reaches the caller
        with pytest.raises(FileNotFoundError):
            await _sync(os.stat, f"{m}/nope")
        await _sync(os.mkdir, f"{m}/full")
        await _sync(lambda: open(f"{m}/full/x", "w").close())
        with pytest.raises(OSError) as e:
            await _sync(os.rmdir, f"{m}/full")
        assert e.value.errno == errno.ENOTEMPTY
        with pytest.raises(FileNotFoundError):  # the walk succeeds, MemFS's unlink says ENOENT
            await _sync(os.unlink, f"{m}/wait/unset")
        with pytest.raises(FileExistsError):
            await _sync(os.mkdir, f"{m}/full")


async def edit_and_check(fn):
    return await _sync(fn)


async def test_blocked_cat_released_by_echo_and_by_9p(tmp_path):
    async with imported(tmp_path) as (fs, mnt, addr, imp):
        cat = await spawn(imp, ["cat", f"{mnt}/wait/k"], stdout=subprocess.PIPE)
        await _eventually(lambda: fs.waiters == 1, what="cat to block")
        await trio.sleep(0.3)
        assert cat.poll() is None
        await sh(f"echo v > {mnt}/wait/k")
        with trio.fail_after(5):
            await cat.wait()
        assert cat.returncode == 0 and await cat.stdout.receive_some(100) == b"v\n"

        cat2 = await spawn(imp, ["cat", f"{mnt}/wait/k2"], stdout=subprocess.PIPE)
        await _eventually(lambda: fs.waiters == 1, what="second cat to block")
        async with open_client(addr) as c:  # another 9P connection writes the value
            await c.write_file("wait/k2", b"from 9p\n")
        with trio.fail_after(5):
            await cat2.wait()
        assert await cat2.stdout.receive_some(100) == b"from 9p\n"
        assert fs.waiters == 0
        # set values read at once, also later offsets from the snapshot
        assert (await sh(f"cat {mnt}/wait/k2 {mnt}/wait/k")).stdout == b"from 9p\nv\n"
        assert sorted(await _sync(os.listdir, f"{mnt}/wait")) == ["k", "k2"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
async def test_killed_reader_leaves_no_waiter(tmp_path, sig):
    async with imported(tmp_path) as (fs, mnt, addr, imp):
        cat = await spawn(imp, ["cat", f"{mnt}/wait/never"], stdout=subprocess.DEVNULL)
        await _eventually(lambda: fs.waiters == 1, what="cat to block")
        t0 = time.monotonic()
        cat.send_signal(sig)
        with trio.fail_after(3):
            await cat.wait()
        assert cat.returncode == -sig
        await _eventually(lambda: fs.waiters == 0, timeout=2.5, what="the waiter to go")
        assert time.monotonic() - t0 < 3
        # the mount still works
        assert (await sh(f"ls {mnt}")).stdout == b"wait\n"


async def test_caught_signal_interrupts_blocked_read(tmp_path):
    """A reader with a SIGINT handler gets EINTR, runs it (KeyboardInterrupt)."""
    code = (
        "import signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "try:\n"
        "    open(sys.argv[1], 'rb').read()\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
    )
    async with imported(tmp_path) as (fs, mnt, addr, imp):
        p = await spawn(imp, [sys.executable, "-c", code, f"{mnt}/wait/never"], stdout=subprocess.PIPE)
        await _eventually(lambda: fs.waiters == 1, what="the reader to block")
        p.send_signal(signal.SIGINT)
        with trio.fail_after(3):
            await p.wait()
        assert await p.stdout.receive_some(100) == b"interrupted\n"
        await _eventually(lambda: fs.waiters == 0, what="the waiter to go")


async def test_reader_with_inherited_fd_is_not_cancelled(tmp_path):
    """The opener (a shell) exits; its child still reads the fd: keep waiting."""
    async with imported(tmp_path) as (fs, mnt, addr, imp):
        out = tmp_path / "out"
        p = await spawn(imp, ["sh", "-c", f"exec 3< {mnt}/wait/inh; (cat <&3 > {out}) & exit 0"])
        await p.wait()
        await _eventually(lambda: fs.waiters == 1, what="the child to block")
        await trio.sleep(1.5)  # several watcher rounds with the opener gone
        assert fs.waiters == 1
        fs.set_value("inh", b"kept\n")
        await _eventually(lambda: out.read_bytes() == b"kept\n", what="the child's output")


async def test_many_blocked_readers_do_not_stall_others(tmp_path):
    n = 500
    async with imported(tmp_path) as (fs, mnt, addr, imp):
        await sh(f"echo status-ok > {mnt}/somefile")
        outs = tmp_path / "outs"
        outs.mkdir()
        cats = []
        for i in range(n):
            with open(outs / str(i), "wb") as f:
                cats.append(await spawn(imp, ["cat", f"{mnt}/wait/key{i}"], stdout=f))
        await _eventually(lambda: fs.waiters == n, timeout=30, what=f"{n} blocked readers")
        t0 = time.monotonic()
        listing = (await sh(f"ls {mnt}", timeout=3)).stdout
        assert listing.split() == [b"somefile", b"wait"]
        assert (await sh(f"cat {mnt}/somefile", timeout=3)).stdout == b"status-ok\n"
        assert await _sync(os.stat, f"{mnt}/somefile")
        assert time.monotonic() - t0 < 3
        for i in range(n):
            fs.set_value(f"key{i}", f"value{i}\n".encode())
        with trio.fail_after(30):
            for c in cats:
                await c.wait()
        assert all(c.returncode == 0 for c in cats)
        assert all((outs / str(i)).read_bytes() == f"value{i}\n".encode() for i in range(n))
        assert fs.waiters == 0


async def test_nonblocking_read_and_poll_readiness(tmp_path):
    async with imported(tmp_path) as (fs, mnt, addr, imp):
        path = f"{mnt}/wait/p"

        def nonblocking_read():
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            try:
                return os.read(fd, 100)
            finally:
                os.close(fd)

        with pytest.raises(BlockingIOError):
            await _sync(nonblocking_read)

        fd = await _sync(os.open, path, os.O_RDONLY)
        try:
            assert await _sync(select.select, [fd], [], [], 0.3) == ([], [], [])

            def poll_for(timeout_ms):
                p = select.poll()
                p.register(fd, select.POLLIN)
                t = time.monotonic()
                return p.poll(timeout_ms), time.monotonic() - t

            async with trio.open_nursery() as nursery:
                result = []

                async def poller():
                    result.append(await _sync(poll_for, 5000))

                nursery.start_soon(poller)
                await trio.sleep(0.5)
                assert not result
                fs.set_value("p", b"ready\n")
            (events, waited) = result[0]
            assert events == [(fd, select.POLLIN)] and waited < 2
            assert await _sync(os.read, fd, 100) == b"ready\n"
        finally:
            await _sync(os.close, fd)
        # a set value is readable at once, through select(2)
        def select_fresh():
            fd = os.open(path, os.O_RDONLY)
            try:
                return select.select([fd], [], [], 2)[0] == [fd]
            finally:
                os.close(fd)
        assert await _sync(select_fresh)
        assert await _sync(nonblocking_read) == b"ready\n"


async def test_sigterm_unmounts_cleanly(tmp_path):
    async with imported(tmp_path) as (fs, mnt, addr, imp):
        assert await _mounted(mnt)
        assert await imp.stop() == 0
        assert not await _mounted(mnt)
        assert not await _sync(is_stale_mount, str(mnt))


async def test_stale_mount_is_cleaned_by_next_start(tmp_path):
    async with imported(tmp_path) as (fs, mnt, addr, imp):
        imp.proc.kill()
        await imp.proc.wait()
        assert await _sync(is_stale_mount, str(mnt))
        again = Import(addr, mnt, tmp_path / "import2.log")
        try:
            await again.start()
            assert (await sh(f"echo x > {mnt}/f && cat {mnt}/f")).stdout == b"x\n"
        finally:
            with trio.CancelScope(shield=True):
                assert await again.stop() == 0
        assert not await _mounted(mnt)


@pytest.mark.parametrize("version", ["9P2000.u", "9P2000"])
async def test_older_dialects(tmp_path, version):
    fs = MemFS()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    async with serving(fs) as (_server, addr):
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "mountd.cli", "import", "--version", version, addr, str(mnt)],
            cwd=str(REPO), stderr=subprocess.DEVNULL,
        )
        imp = Import(addr, mnt, tmp_path / "log")
        imp.proc = proc
        try:
            await _eventually_async(lambda: _mounted(mnt), what="mount")
            m = str(mnt)
            await sh(f"echo hi > {m}/f && mkdir {m}/d && mv {m}/f {m}/g")
            assert (await sh(f"cat {m}/g; ls {m}")).stdout == b"hi\nd\ng\nwait\n"
            cat = await trio.lowlevel.open_process(["cat", f"{m}/wait/k"], stdout=subprocess.PIPE)
            try:
                await _eventually(lambda: fs.waiters == 1, what="cat to block")
                await sh(f"echo v > {m}/wait/k")
                with trio.fail_after(5):
                    await cat.wait()
                assert await cat.stdout.receive_some(10) == b"v\n"
            finally:
                if cat.returncode is None:
                    cat.kill()
                    await cat.wait()
        finally:
            with trio.CancelScope(shield=True):
                assert await imp.stop() == 0
                if await _sync(os.path.ismount, str(mnt)):
                    await _sync(_force_unmount, mnt)


async def _eventually_async(pred, timeout: float = MOUNT_TIMEOUT, what: str = "condition") -> None:
    deadline = trio.current_time() + timeout
    while not await pred():
        if trio.current_time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await trio.sleep(0.05)


class _CtlFS:
    """A tree with one ``ctl`` file that records every write call it gets."""

    def __init__(self):
        from ninep.fs import Attr, FileSystem, Node, OpenFile
        from ninep.qid import QTDIR, Qid

        writes = self.writes = []

        class Ctl(OpenFile):
            async def write(self, offset, data):
                writes.append(bytes(data))
                return len(data)

        class CtlNode(Node):
            def qid(self):
                return Qid(0, 0, 2)

            async def getattr(self):
                return Attr(qid=self.qid(), mode=0o100666)

            async def open(self, flags):
                return Ctl(flags)

        class Root(Node):
            def qid(self):
                return Qid(QTDIR, 0, 1)

            async def getattr(self):
                return Attr(qid=self.qid(), mode=0o040755)

            async def walk(self, name):
                if name != "ctl":
                    raise FsError(errno.ENOENT, name)
                return CtlNode()

        class FS(FileSystem):
            async def attach(self, uname, aname, n_uname=None):
                return Root()

        self.fs = FS()


async def test_one_ctl_command_per_write(tmp_path):
    ctl = _CtlFS()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    async with serving(ctl.fs) as (_server, addr):
        imp = Import(addr, mnt, tmp_path / "log")
        try:
            await imp.start()
            # echo: O_TRUNC → setattr(size 0), accepted by the default Node.setattr
            await sh(f"echo start vm1 > {mnt}/ctl && printf 'stop vm1\\nkill vm2\\n' >> {mnt}/ctl")

            def two_writes():
                fd = os.open(f"{mnt}/ctl", os.O_WRONLY)
                try:
                    os.write(fd, b"a")
                    os.write(fd, b"b c")
                finally:
                    os.close(fd)

            await _sync(two_writes)
            assert ctl.writes == [b"start vm1\n", b"stop vm1\nkill vm2\n", b"a", b"b c"]
        finally:
            with trio.CancelScope(shield=True):
                await imp.stop()
                if await _sync(os.path.ismount, str(mnt)):
                    await _sync(_force_unmount, mnt)


async def test_lost_connection_unmounts_with_status_1(tmp_path):
    fs = MemFS()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    imp = None
    try:
        async with serving(fs) as (_server, addr):
            imp = Import(addr, mnt, tmp_path / "log")
            await imp.start()
        # the server and its connections are gone
        with trio.fail_after(10):
            await imp.proc.wait()
        assert imp.proc.returncode == 1
        assert not await _sync(os.path.ismount, str(mnt))
    finally:
        with trio.CancelScope(shield=True):
            if imp is not None:
                await imp.stop()
            if await _sync(os.path.ismount, str(mnt)):
                await _sync(_force_unmount, mnt)


async def test_in_process_mount_of_a_local_filesystem(tmp_path):
    """mountd.fuse.mount() in this process over a local MemFS (no 9P): the
    path ``cloudfs up`` takes.  Large listings page through readdir, readiness
    without wait_readable, a killed reader's local waiter, handles released."""
    from mountd.fuse import mount

    fs = MemFS()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = str(mnt)
    names = [f"key-{i:04d}-{'x' * 40}" for i in range(400)]
    for n in names:
        fs.set_value(n, b"v\n")
    async with trio.open_nursery() as nursery:
        adapter = await nursery.start(lambda task_status: mount(fs, m, task_status=task_status))
        try:
            # 400 long names need several readdir calls: none lost, none twice
            listing = await _sync(os.listdir, f"{m}/wait")
            assert sorted(listing) == sorted(names)
            assert (await sh(f"ls {m}/wait | wc -l")).stdout.strip() == b"400"

            # poll readiness through the readable() re-check path
            def poll_until_set():
                fd = os.open(f"{m}/wait/later", os.O_RDONLY)
                try:
                    p = select.poll()
                    p.register(fd, select.POLLIN)
                    first = p.poll(0)
                    return first, p.poll(5000), os.read(fd, 10)
                finally:
                    os.close(fd)

            async with trio.open_nursery() as n2:
                out = []

                async def poller():
                    out.append(await _sync(poll_until_set))

                n2.start_soon(poller)
                await trio.sleep(0.4)
                fs.set_value("later", b"now\n")
            first, events, data = out[0]
            assert first == [] and events[0][1] & select.POLLIN and data == b"now\n"

            # a killed reader's waiter goes away
            cat = await trio.lowlevel.open_process(["cat", f"{m}/wait/never"], stdout=subprocess.DEVNULL)
            try:
                await _eventually(lambda: fs.waiters == 1, what="cat to block")
                assert adapter.blocked_reads == 1
                cat.send_signal(signal.SIGINT)
                with trio.fail_after(3):
                    await cat.wait()
                await _eventually(lambda: fs.waiters == 0 and adapter.blocked_reads == 0, timeout=2.5,
                                  what="the waiter to go")
            finally:
                if cat.returncode is None:
                    cat.kill()
                    await cat.wait()
            await _eventually(lambda: adapter.open_handles == 0, what="handles released")
        finally:
            nursery.cancel_scope.cancel()
    assert not await _sync(os.path.ismount, m)
