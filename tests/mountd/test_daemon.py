"""``cloudfs up`` through the kernel's FUSE and over 9P (issue "mountd").

Most tests run the daemon as a child process (``python -m mountd.cli up
--driver fake`` with its embedded ZooKeeper), wait for the mount, then use
plain ``os`` calls and real ``ls``, ``cat``, ``echo``, ``grep``, ``tail``
processes.  The waiter test runs the daemon inside the test (same code,
:func:`mountd.daemon.run`) to look at the ZooKeeper store's waiter count.
Every daemon is stopped and every mount removed in ``finally`` blocks.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from mountd.daemon import DaemonOptions, run
from mountd.zkserver import free_port
from ninep.client import open_client
from ninep.errors import FsError

REPO = Path(__file__).resolve().parents[2]


def _live(mnt: Path) -> bool:
    if not os.path.ismount(mnt):
        return False
    try:
        os.statvfs(mnt)
        return True
    except OSError:
        return False


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Daemon:
    """A ``cloudfs up`` child process with its mount, state dir and 9P addresses."""

    def __init__(self, tmp: Path, port: int | None = None, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        self.extra = list(extra)
        self.env = env
        self.state = tmp / "state"
        self.mnt = tmp / "mnt"
        self.mnt.mkdir(exist_ok=True)
        self.port = port or free_port()
        self.tcp = f"tcp!127.0.0.1!{self.port}"
        self.operator = f"unix!{self.state / 'cloudfs.sock'}"
        self.log = tmp / "daemon.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Daemon":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mountd.cli", "up", "--driver", "fake", "--mount", str(self.mnt),
                 "--state-dir", str(self.state), "--listen", self.tcp, *self.extra],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                env=None if self.env is None else {**os.environ, **self.env})
        try:
            _wait(lambda: b"cloudfs up:" in self.log.read_bytes() and _live(self.mnt) or self.proc.poll() is not None,
                  60, "the daemon to come up")
            assert self.proc.poll() is None, self.log.read_text()
        except BaseException:
            self.kill()
            raise
        return self

    def path(self, rel: str) -> Path:
        return self.mnt / rel

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def cleanup(self) -> None:
        self.kill(signal.SIGTERM)
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    try:
        yield d.start()
    finally:
        d.cleanup()


def sh(cmd: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=timeout)


def test_shell_tools_on_the_mount(daemon):
    m = daemon.mnt
    assert sorted(os.listdir(m)) == ["files", "hosts", "images", "net", "proc"]
    assert sh(f"ls {m}/proc").stdout.split() == ["1"]
    assert sh(f"grep state {m}/proc/1/status").stdout == "state running\n"
    # the documented way to start a VM from a shell
    out = sh(f"exec 3<>{m}/proc/1/ctl; echo fork >&3; cat <&3")
    assert out.returncode == 0 and out.stdout == "2\n"
    assert sh(f"tail -1 {m}/proc/1/children").stdout == "2\n"
    assert sh(f"echo '#!/bin/sh' > {m}/proc/2/userdata && cat {m}/proc/2/userdata").stdout == "#!/bin/sh\n"
    assert sh(f"echo exec tiny > {m}/proc/2/ctl").returncode == 0
    _wait(lambda: "state running" in daemon.path("proc/2/status").read_text(), 10, "pid 2 running")
    assert "image tiny" in sh(f"cat {m}/proc/2/status").stdout
    st = os.stat(m / "proc/2/status")
    assert st.st_size == 0 and (st.st_mode & 0o777) == 0o444
    assert sh(f"ls {m}/images").stdout.split() == ["alpine", "tiny"]
    assert "cidr 10.0.0.0/24" in sh(f"cat {m}/net/user").stdout
    # env with os calls
    (m / "proc/2/env/colour").write_text("blue\n")
    assert os.listdir(m / "proc/2/env") == ["colour"]
    assert (m / "proc/2/env/colour").read_text() == "blue\n"
    os.unlink(m / "proc/2/env/colour")
    assert os.listdir(m / "proc/2/env") == []


def test_fuse_and_9p_views_are_the_same_bytes(daemon):
    sh(f"echo fork > {daemon.mnt}/proc/1/ctl")

    async def over_9p():
        out = {}
        async with open_client(daemon.operator) as c:
            for path in ("proc/1/status", "proc/2/status", "proc/1/children", "images/tiny", "net/user"):
                out[path] = await c.read_file(path)
            out["ls"] = sorted(await c.listdir("proc"))
        async with open_client(daemon.tcp) as c:  # the public face reads the same
            out["public"] = await c.read_file("proc/2/status")
        return out

    got = trio.run(over_9p)
    for path in ("proc/1/status", "proc/2/status", "proc/1/children", "images/tiny", "net/user"):
        assert daemon.path(path).read_bytes() == got[path], path
    assert sorted(os.listdir(daemon.mnt / "proc")) == got["ls"]
    assert got["public"] == got["proc/2/status"]


def test_blocked_cat_released_by_a_write_through_9p(daemon):
    cat = subprocess.Popen(["cat", str(daemon.path("proc/1/env/result"))], stdout=subprocess.PIPE)
    try:
        time.sleep(0.5)
        assert cat.poll() is None  # blocked

        async def write():
            async with open_client(daemon.operator) as c:
                await c.write_file("proc/1/env/result", b"42\n")

        trio.run(write)
        out, _ = cat.communicate(timeout=10)
        assert out == b"42\n" and cat.returncode == 0
    finally:
        cat.kill()
        cat.wait()


def test_public_face_without_credential_is_read_only(daemon):
    async def try_write():
        async with open_client(daemon.tcp) as c:
            assert b"init" in await c.read_file("proc/1/status")
            with pytest.raises(FsError) as e:
                await c.write_file("proc/1/ctl", b"fork\n")
            return e.value.errno

    assert trio.run(try_write) == errno.EACCES
    assert sh(f"cat {daemon.mnt}/proc/1/children").stdout == ""


def test_bad_ctl_commands_are_einval_and_change_nothing(daemon):
    m = daemon.mnt
    sh(f"echo fork > {m}/proc/1/ctl")  # pid 2, state new
    before = (sh(f"ls {m}/proc").stdout, sh(f"cat {m}/proc/2/status").stdout)
    for bad in ["frok", "exec", "exec nosuchimage", "exec tiny flavor=huge", "fork bogus=1", "fork name=a/b",
                "stop", ""]:
        fd = os.open(m / "proc/2/ctl", os.O_WRONLY)
        try:
            with pytest.raises(OSError) as e:
                os.write(fd, bad.encode() + b"\n")
            assert e.value.errno == errno.EINVAL, bad
        finally:
            os.close(fd)
    out = sh(f"/bin/echo frok > {m}/proc/2/ctl")  # dash's builtin echo calls every write error "I/O error"
    assert out.returncode != 0 and "Invalid argument" in out.stderr
    assert (sh(f"ls {m}/proc").stdout, sh(f"cat {m}/proc/2/status").stdout) == before
    assert sh(f"cat {m}/proc/2/children").stdout == ""


def test_500_blocked_readers_do_not_stall_others(daemon):
    m = daemon.mnt
    n = 500
    readers = []
    try:
        for i in range(n):
            readers.append(subprocess.Popen(["cat", str(m / f"proc/1/env/k{i}")], stdout=subprocess.PIPE))
        time.sleep(1.0)
        assert all(r.poll() is None for r in readers)
        t0 = time.monotonic()
        assert sh(f"ls {m}/proc", timeout=10).stdout.split() == ["1"]
        assert "state running" in sh(f"cat {m}/proc/1/status", timeout=10).stdout
        assert time.monotonic() - t0 < 5

        async def release():
            async with open_client(daemon.operator) as c:
                await c.write_file("proc/1/limits", b"env-keys 1000")  # init's default is 256
                for i in range(n):
                    await c.write_file(f"proc/1/env/k{i}", b"v%d\n" % i)

        trio.run(release)
        for i, r in enumerate(readers):
            out, _ = r.communicate(timeout=30)
            assert out == b"v%d\n" % i
    finally:
        for r in readers:
            if r.poll() is None:
                r.kill()
            r.wait()


def test_sigterm_unmounts_cleanly(daemon):
    daemon.kill(signal.SIGTERM)
    assert daemon.proc.returncode == 0, daemon.log.read_text()
    assert not os.path.ismount(daemon.mnt)
    assert not (daemon.state / "cloudfs.sock").exists()


def test_restart_after_kill_9_finds_every_record(tmp_path):
    d = Daemon(tmp_path)
    try:
        d.start()
        m = d.mnt
        sh(f"echo fork > {m}/proc/1/ctl; echo fork > {m}/proc/1/ctl")
        sh(f"echo hello > {m}/proc/2/userdata; echo v > {m}/proc/3/env/k; echo exec tiny > {m}/proc/3/ctl")
        _wait(lambda: "state running" in d.path("proc/3/status").read_text(), 10, "pid 3 running")
        before = {p: d.path(f"proc/{p}/status").read_text() for p in ("1", "2", "3")}
        d.kill(signal.SIGKILL)
        assert os.path.ismount(m)  # left behind, stale
        d.start()  # same state dir and mount point: cleans the stale mount, same ZooKeeper data
        assert sh(f"ls {m}/proc").stdout.split() == ["1", "2", "3"]
        assert d.path("proc/2/userdata").read_text() == "hello\n"
        assert d.path("proc/3/env/k").read_text() == "v\n"
        after = {p: d.path(f"proc/{p}/status").read_text() for p in ("1", "2")}
        assert after == {p: before[p] for p in ("1", "2")}
        assert "image tiny" in d.path("proc/3/status").read_text()
        assert sh(f"exec 3<>{m}/proc/1/ctl; echo fork >&3; cat <&3").stdout == "4\n"  # pids never reused
    finally:
        d.cleanup()


async def test_killed_blocked_reader_leaves_no_waiter(tmp_path):
    mnt = tmp_path / "mnt"
    opts = DaemonOptions(mount=mnt, listen=[f"tcp!127.0.0.1!{free_port()}"], driver="fake",
                         state_dir=tmp_path / "state")
    async with trio.open_nursery() as nursery:
        info = await nursery.start(run, opts)
        store = info["fs"].store
        env = info["fs"].layout.env(1)  # only the env read's waits (the reconciler has its own)
        try:
            proc = await trio.lowlevel.open_process(["cat", str(mnt / "proc/1/env/never")], stdout=subprocess.DEVNULL)
            with trio.fail_after(10):
                while store.waiter_count(env) == 0:
                    await trio.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            with trio.fail_after(10):
                await proc.wait()
            with trio.fail_after(10):
                while store.waiter_count(env) != 0:
                    await trio.sleep(0.05)
            # the mount still answers
            assert await trio.to_thread.run_sync(lambda: os.listdir(mnt / "proc")) == ["1"]
        finally:
            nursery.cancel_scope.cancel()
    assert not os.path.ismount(mnt)


def test_select_waits_for_env_key_and_wait_record(daemon):
    import select

    m = daemon.mnt
    sh(f"echo fork > {m}/proc/1/ctl")  # pid 2 (new): killing it leaves a wait record for init
    fd = os.open(m / "proc/1/env/ready", os.O_RDONLY | os.O_NONBLOCK)
    wfd = os.open(m / "proc/1/wait", os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert select.select([fd, wfd], [], [], 0.5)[0] == []  # nothing yet
        with pytest.raises(BlockingIOError):
            os.read(fd, 100)

        async def write():
            async with open_client(daemon.operator) as c:
                await c.write_file("proc/1/env/ready", b"yes\n")

        trio.run(write)
        assert select.select([fd], [], [], 10)[0] == [fd]
        assert os.read(fd, 100) == b"yes\n"
        assert select.select([wfd], [], [], 0.3)[0] == []
        sh(f"echo kill > {m}/proc/2/ctl")
        assert select.select([wfd], [], [], 10)[0] == [wfd]
        assert os.read(wfd, 100).startswith(b"2 ")
    finally:
        os.close(fd)
        os.close(wfd)


def test_a_second_daemon_on_the_same_state_dir_is_refused(daemon):
    other = subprocess.run(
        [sys.executable, "-m", "mountd.cli", "up", "--driver", "fake", "--state-dir", str(daemon.state),
         "--listen", f"tcp!127.0.0.1!{free_port()}"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert other.returncode == 1 and "another cloudfs up" in other.stderr
    # the running daemon is untouched: its operator socket and ZooKeeper still answer
    assert (daemon.state / "cloudfs.sock").exists()
    assert sh(f"ls {daemon.mnt}/proc").stdout.split() == ["1"]

    async def ps():
        async with open_client(daemon.operator) as c:
            return await c.listdir("proc")

    assert trio.run(ps) == ["1"]
