"""``/files`` through the kernel's FUSE and over 9P, with the local backend
(``cloudfs up --driver fake``): shell tools on the mount, a 1 GiB file
streamed through in bounded daemon memory (also on Swift), the same bytes
over 9P, and the files surviving a restart.  Guests are in
tests/test_e2e_qemu.py, two daemons on one Swift container in
tests/mountd/test_daemon_openstack.py."""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid

import pytest
import trio

from ninep.client import open_client
from tests.mountd.test_daemon import Daemon, daemon, sh  # noqa: F401  (daemon: a fixture)
from tests.mountd.test_daemon_openstack import drop_container
from tests.openstack import openstack_cloud  # noqa: F401  (a fixture)


@pytest.fixture(params=["local", "swift"])
def any_daemon(request, tmp_path):
    """A daemon whose /files is local, or in a Swift container of the
    control plane (tests/openstack.py)."""
    extra, env, cloud, container = (), None, None, None
    if request.param == "swift":
        cloud = request.getfixturevalue("openstack_cloud")
        container = f"cloudfs-test-{uuid.uuid4().hex[:12]}"
        extra = ("--files", "swift", "--os-cloud", cloud.cloud, "--files-container", container)
        env = cloud.env()
    d = Daemon(tmp_path, extra=extra, env=env)
    try:
        yield d.start()
    finally:
        d.cleanup()
        if cloud is not None:
            drop_container(cloud.connect(), container)


def rss_peak_kib(pid: int) -> int:
    """VmHWM (KiB): the most resident memory the process has had."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_shell_tools_on_files(daemon):
    f = daemon.mnt / "files"
    assert sorted(os.listdir(daemon.mnt)) == ["files", "hosts", "images", "net", "proc"]
    out = sh(f"mkdir -p {f}/a/b && printf 'hello' > {f}/a/b/x && ls -l {f}/a/b && cat {f}/a/b/x")
    assert out.returncode == 0, out.stderr
    assert " 5 " in out.stdout and out.stdout.endswith("hello")
    # append, a write at an offset, truncate, cp, mv, rm, rmdir
    assert sh(f"printf ' world' >> {f}/a/b/x && cat {f}/a/b/x").stdout == "hello world"
    assert sh(f"printf 'J' | dd of={f}/a/b/x bs=1 seek=6 conv=notrunc status=none && cat {f}/a/b/x").stdout \
        == "hello Jorld"
    assert sh(f"truncate -s 5 {f}/a/b/x && stat -c %s {f}/a/b/x").stdout == "5\n"
    assert sh(f"cp {f}/a/b/x {f}/copy && mv {f}/copy {f}/a/moved && ls {f} {f}/a").stdout.split() == \
        [f"{f}:", "a", f"{f}/a:", "b", "moved"]
    assert sh(f"rmdir {f}/a").returncode != 0  # not empty
    assert sh(f"rm -r {f}/a && ls -A {f}").stdout == ""
    assert sh(f"ln -s x {f}/l").returncode != 0
    # df shows the deployment's limits
    assert "files" in sh(f"df {f}").stdout or sh(f"df {f}").returncode == 0
    # mtimes are true
    sh(f"touch -d '2001-02-03 04:05:06' {f}/t")
    assert sh(f"date -r {f}/t +%Y").stdout == "2001\n"


def test_a_1_gib_file_streams_through_in_bounded_memory(any_daemon):
    """Local: straight to the file.  Swift: spooled to disk, stored in one
    streamed PUT at close, read back through the 1 MiB window."""
    daemon = any_daemon
    f = daemon.mnt / "files"
    pid = daemon.proc.pid
    sh(f"dd if=/dev/zero of={f}/warm bs=1M count=8 status=none && cat {f}/warm > /dev/null")
    before = rss_peak_kib(pid)
    # 1 GiB of a repeated random MiB: checksummed on both sides without keeping it
    w = subprocess.run(["sh", "-c", f"head -c 1048576 /dev/urandom > {daemon.mnt.parent}/mib && "
                        f"for i in $(seq 1024); do cat {daemon.mnt.parent}/mib; done | tee {f}/big | md5sum"],
                       capture_output=True, text=True, timeout=600)
    assert w.returncode == 0, w.stderr
    assert os.stat(f / "big").st_size == 1 << 30
    r = subprocess.run(["sh", "-c", f"md5sum < {f}/big"], capture_output=True, text=True, timeout=600)
    assert r.stdout.split()[0] == w.stdout.split()[0]
    grown = rss_peak_kib(pid) - before
    assert grown < 8 * 1024, f"the daemon's peak RSS grew by {grown} KiB for a 1 GiB file"
    os.unlink(f / "big")


def test_9p_reads_what_fuse_wrote_and_files_outlive_a_restart(daemon, tmp_path):
    f = daemon.mnt / "files"
    data = os.urandom(3 * 1024 * 1024 + 17)
    (f / "r.bin").write_bytes(data)

    async def over_9p() -> bytes:
        async with open_client(daemon.operator, aname="") as c:
            return await c.read_file("files/r.bin")

    assert trio.run(over_9p) == data
    daemon.kill()
    daemon.cleanup()
    d2 = Daemon(tmp_path).start()
    try:
        assert hashlib.sha256((d2.mnt / "files/r.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
    finally:
        d2.cleanup()
