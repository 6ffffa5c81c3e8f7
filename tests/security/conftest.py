"""Fixtures of the attack replays: a ``cloudfs up --driver fake`` child
process on a ZooKeeper of its own (so ZooKeeper's watch count is this
daemon's alone), reached over 9P on its public TCP face as an attacker
would, with a canary that reads ``/proc/1/status`` throughout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import trio

from mountd.zkserver import four_letter_word, free_port
from ninep.client import open_client

REPO = Path(__file__).resolve().parents[2]


class Daemon:
    """A ``cloudfs up`` child process: ``tcp`` (the public face),
    ``operator`` (its unix socket), ``log``; :meth:`rss` and :meth:`fds`
    read its memory (bytes) and open descriptors from /proc."""

    def __init__(self, tmp: Path, zk, *extra: str):
        self.state = tmp / "state"
        self.port = free_port()
        self.tcp = f"tcp!127.0.0.1!{self.port}"
        self.operator = f"unix!{self.state / 'cloudfs.sock'}"
        self.log = tmp / "daemon.log"
        self.zk = zk
        self.extra = extra
        self.deployment = f"sec-{uuid.uuid4().hex[:8]}"
        self.root = f"/cloudfs/{self.deployment}"  # its ZooKeeper tree
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Daemon":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mountd.cli", "up", "--driver", "fake", "--zookeeper", self.zk.hosts,
                 "--deployment", self.deployment, "--state-dir", str(self.state),
                 "--listen", self.tcp, *self.extra],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while b"cloudfs up:" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"daemon did not come up:\n{self.log.read_text()}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def tracebacks(self) -> list[str]:
        """Lines of the daemon's log that belong to a traceback."""
        return [line for line in self.log.read_text(errors="replace").splitlines()
                if line.startswith("Traceback") or "internal error" in line]

    def zk_watches(self) -> int:
        """ZooKeeper's count of watches (all of this daemon's sessions)."""
        for line in four_letter_word(self.zk.port, "wchs").splitlines():
            if line.startswith("Total watches:"):
                return int(line.split(":")[1])
        raise AssertionError("ZooKeeper does not answer wchs")


@pytest.fixture
def daemon(tmp_path, private_zookeeper):
    d = Daemon(tmp_path, private_zookeeper).start()
    try:
        yield d
    finally:
        d.stop()


class Canary:
    """Reads /proc/1/status over the public face every ``interval`` s;
    ``worst`` is the slowest answer (s), ``failures`` what went wrong."""

    def __init__(self, dial: str, interval: float = 0.25):
        self.dial, self.interval = dial, interval
        self.worst = 0.0
        self.reads = 0
        self.failures: list[str] = []

    async def target(self) -> str | trio.abc.Stream:
        """What each read connects to (a dial string, or a connected stream)."""
        return self.dial

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            t0 = trio.current_time()
            try:
                with trio.fail_after(5):
                    async with open_client(await self.target()) as c:
                        assert (await c.read_file("proc/1/status")).startswith(b"pid 1\n")
            except Exception as e:  # noqa: BLE001 - recorded, asserted on by the test
                self.failures.append(repr(e))
            self.worst = max(self.worst, trio.current_time() - t0)
            self.reads += 1
            await trio.sleep(self.interval)

    def check(self, limit: float = 1.0) -> None:
        assert self.reads > 0 and not self.failures, self.failures[:5]
        assert self.worst < limit, f"the canary took {self.worst:.2f}s"
