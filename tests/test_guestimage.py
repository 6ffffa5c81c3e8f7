"""The "tiny" guest image (cloudfs/guestimage.py) and the QEMU harness (tests/guest.py).

One guest boots per module (``guest`` fixture) with two guestfwd rules:
10.0.2.100:564 -> a Debian ``diod`` 9P server on 127.0.0.1, and
10.0.2.100:565 -> a plain TCP listener the test owns.  A second, short boot
checks the non-shell boot path with a file added by ``append_files``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import socket
import subprocess
import time

import pytest

from cloudfs.guestimage import append_files, build_tiny, write_cpio
from tests.guest import Guest, GuestError, GuestTimeout, booted_guest
from tests.guestfixtures import CACHE_DIR

pytestmark = pytest.mark.guest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A directory diod exports: one small file."""
    d = tmp_path_factory.mktemp("export")
    (d / "somefile").write_text("hello from the host\n")
    return d


@pytest.fixture(scope="module")
def diod_port(export, tmp_path_factory):
    """A foreground diod (no auth) exporting ``export`` on 127.0.0.1:<port>; the port."""
    diod = shutil.which("diod") or "/usr/sbin/diod"
    port = _free_port()
    log = open(tmp_path_factory.mktemp("diod") / "diod.log", "wb")
    proc = subprocess.Popen([diod, "-f", "-n", "-l", f"127.0.0.1:{port}", "-e", str(export),
                             "-L", "stderr"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"diod did not start (status {proc.poll()})")
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def listener():
    """A listening TCP socket on 127.0.0.1:<free port> (the guest reaches it as 10.0.2.100:565)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    s.settimeout(30)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def guest(tiny_image, diod_port, listener, tmp_path_factory):
    """One booted shell-mode guest for the whole module."""
    log = tmp_path_factory.mktemp("guest") / "console.log"
    forwards = {564: diod_port, 565: listener.getsockname()[1]}
    with booted_guest(tiny_image, log, forwards=forwards) as g:
        yield g


# -- image -----------------------------------------------------------------


def test_image_is_cached_and_checksummed(tiny_image):
    again = build_tiny(CACHE_DIR, progress=lambda line: None)
    assert again == tiny_image
    data = tiny_image.kernel.read_bytes() + tiny_image.initramfs.read_bytes()
    assert hashlib.sha256(data).hexdigest() == tiny_image.checksum
    assert tiny_image.size == len(data)
    assert tiny_image.name == "tiny" and tiny_image.id == "tiny-" + tiny_image.checksum[:12]
    manifest = json.loads((CACHE_DIR / "manifest.json").read_text())
    assert manifest["checksum"] == tiny_image.checksum
    assert manifest["inputs"]["kernel"].startswith("linux-image-")
    assert {"9p", "9pnet", "9pnet_fd", "virtio_net", "virtio_pci"} <= set(tiny_image.modules)
    # Dependencies load first.
    mods = list(tiny_image.modules)
    assert mods.index("9pnet") < mods.index("9p")
    assert mods.index("9pnet") < mods.index("9pnet_fd")
    assert mods.index("virtio") < mods.index("virtio_net")


def test_initramfs_lists_with_cpio(tiny_image):
    """The archive is valid newc for GNU cpio too (not only for the kernel)."""
    raw = gzip.decompress(tiny_image.initramfs.read_bytes())
    names = subprocess.run(["cpio", "-it", "--quiet"], input=raw, capture_output=True,
                           check=True).stdout.decode().split()
    assert "init" in names and "bin/busybox" in names and "dev/console" in names
    assert f"lib/modules/{tiny_image.kernel_release}/9p.ko" in names


def test_write_cpio_is_deterministic():
    import stat
    entries = [("a", stat.S_IFDIR | 0o755, b""), ("a/b", stat.S_IFREG | 0o644, b"xyz")]
    assert write_cpio(entries) == write_cpio(entries)
    with pytest.raises(ValueError):
        write_cpio([("/abs", stat.S_IFREG | 0o644, b"")])


def test_append_files_output_is_its_owners_alone_whatever_the_umask(tiny_image, tmp_path):
    """It may hold a guest's identity: mode 0600, set without the process's
    umask (every thread's: the QEMU driver calls it from worker threads),
    also over a stale ``.tmp`` of another mode."""
    import os
    import stat
    out = tmp_path / "initrd"
    stale = tmp_path / "initrd.tmp"
    stale.write_bytes(b"stale")
    stale.chmod(0o666)
    old = os.umask(0)
    try:
        append_files(tiny_image.initramfs, {"/etc/x": "y"}, out)
        assert os.umask(0) == 0  # untouched
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert not stale.exists()


def test_boot_mode_runs_appended_script_and_powers_off(tiny_image, tmp_path):
    """Without cloudfs.mode=shell, /init runs /etc/cloudfs/boot (added by append_files), then powers off."""
    script = "#!/bin/sh\necho boot-script-ran $(uname -r)\ngrep -c 9p /proc/filesystems\n"
    initrd = append_files(tiny_image.initramfs, {"/etc/cloudfs/boot": script,
                                                 "etc/cloudfs/extra.txt": b"x"},
                          tmp_path / "initrd.gz")
    assert initrd.read_bytes().startswith(tiny_image.initramfs.read_bytes())
    g = Guest(tiny_image, tmp_path / "console.log", initramfs=initrd, mode="boot")
    try:
        g.boot()
        g.wait_exit(90)
    finally:
        g.close()
    text = g.console_text()
    assert f"boot-script-ran {tiny_image.kernel_release}" in text
    assert "/etc/cloudfs/boot exited with 0" in text
    assert "cloudfs-guest: powering off" in text
    assert (tmp_path / "console.log").read_bytes().decode(errors="replace") == text


# -- shell harness -----------------------------------------------------------


def test_uname(guest, tiny_image):
    assert guest.run("uname -r", 20) == (0, tiny_image.kernel_release + "\n")


def test_9p_filesystem_registered(guest):
    status, out = guest.run("cat /proc/filesystems | grep 9p", 20)
    assert status == 0 and "9p" in out.split()


def test_network_configured(guest):
    status, out = guest.run("ip addr show eth0; ip route", 20)
    assert status == 0
    assert "inet 10.0.2.15/24" in out
    assert "default via 10.0.2.2" in out


def test_status_output_and_state(guest):
    assert guest.run("false", 10) == (1, "")
    assert guest.run("exit_code() { return 7; }; exit_code", 10) == (7, "")
    assert guest.run("printf 'no newline'", 10) == (0, "no newline")
    assert guest.run("echo err >&2", 10) == (0, "err\n")
    assert guest.run("cd /proc && X=42", 10)[0] == 0
    assert guest.run('echo "$PWD $X"', 10) == (0, "/proc 42\n")
    assert guest.run("cd /", 10)[0] == 0
    status, out = guest.run("echo one\necho two # a comment", 10)
    assert (status, out) == (0, "one\ntwo\n")


def test_ctrl_c_interrupts_foreground(guest):
    pending = guest.begin("sleep 100")
    guest.wait_started(pending, 10)
    time.sleep(0.3)  # let sleep start
    t0 = time.monotonic()
    guest.interrupt()
    status, out = pending.wait(10)
    assert status == 130  # 128 + SIGINT
    assert time.monotonic() - t0 < 3
    assert guest.run("echo still here", 10) == (0, "still here\n")


def test_shell_exit_is_reported_and_recovered(guest):
    with pytest.raises(GuestError, match="shell exited"):
        guest.run("exit 3", 10)
    # The next command waits for /init's new shell and re-arms the SIGINT trap.
    assert guest.run("echo back", 30) == (0, "back\n")
    p = guest.begin("sleep 100")
    guest.wait_started(p, 10)
    time.sleep(0.3)
    guest.interrupt()
    assert p.wait(10)[0] == 130


def test_run_timeout_interrupts(guest):
    with pytest.raises(GuestTimeout):
        guest.run("sleep 100", timeout=1)
    assert guest.run("echo ok", 10) == (0, "ok\n")


def test_background_job(guest):
    job = guest.start("echo started; sleep 1000")
    assert guest.run(f"kill -0 {job.pid}", 10)[0] == 0
    # ^C only reaches the foreground, not background jobs.
    p = guest.begin("sleep 50")
    guest.wait_started(p, 10)
    time.sleep(0.3)
    guest.interrupt()
    assert p.wait(10)[0] == 130
    assert guest.run(f"kill -0 {job.pid}", 10)[0] == 0
    assert guest.run(f"cat {job.log}", 10) == (0, "started\n")
    assert guest.run(f"kill {job.pid}", 10)[0] == 0


def test_guest_reaches_host_listener(guest, listener):
    p = guest.begin("echo hello-from-guest | nc 10.0.2.100 565")
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(20)
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(100)
            assert chunk, "connection closed early"
            data += chunk
        assert data == b"hello-from-guest\n"
        conn.sendall(b"hello-from-host\n")
    status, out = p.wait(20)
    assert (status, out) == (0, "hello-from-host\n")


def test_mount_9p_against_diod(guest, export):
    cmd = (f"mkdir -p /mnt/d && mount -t 9p -o trans=tcp,port=564,version=9p2000.L,"
           f"aname={export},uname=root,access=any 10.0.2.100 /mnt/d")
    status, out = guest.run(cmd, 60)
    assert status == 0, out
    try:
        assert guest.run("ls /mnt/d", 30) == (0, "somefile\n")
        assert guest.run("cat /mnt/d/somefile", 30) == (0, "hello from the host\n")
        assert guest.run("echo written-by-guest > /mnt/d/new && sync", 30)[0] == 0
        assert (export / "new").read_text() == "written-by-guest\n"
    finally:
        guest.run("umount /mnt/d", 30)


def test_console_log_has_everything(guest):
    guest.run("echo log-marker-xyz", 10)
    assert "log-marker-xyz" in guest.console_log.read_text(errors="replace")
    assert "cloudfs-guest: shell ready" in guest.console_log.read_text(errors="replace")


def test_tcp_forward_mode_and_factory_cleanup(guest_factory):
    """forward_mode="tcp": QEMU connects at startup; the guest's connection rides on it."""
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        ls.settimeout(60)
        g = guest_factory(forwards={564: ls.getsockname()[1]}, forward_mode="tcp")
        conn, _ = ls.accept()  # already made by QEMU while booting
        with conn:
            conn.settimeout(20)
            g.start("echo via-chardev | nc 10.0.2.100 564")
            assert conn.recv(100) == b"via-chardev\n"
    g.close()
    assert g.proc.poll() is not None


def test_tty_stdin_and_send(guest):
    p = guest.begin("read -r line && echo got:$line", tty_stdin=True)
    guest.wait_started(p, 10)
    guest.send("typed text\n")
    assert p.wait(10) == (0, "got:typed text\n")
    # Without tty_stdin a stdin reader sees EOF instead of eating protocol lines.
    assert guest.run("cat; echo done", 10) == (0, "done\n")


async def test_usable_from_trio(guest):
    import trio
    assert await guest.arun("echo from-trio", 10) == (0, "from-trio\n")
    p = guest.begin("sleep 100")
    await trio.to_thread.run_sync(guest.wait_started, p, 10)
    guest.interrupt()
    assert (await guest.await_pending(p, 10))[0] == 130
