"""``cloudfs up`` run by a non-root user (nobody), as the README shows: the
QEMU driver (QEMU in a user + network namespace of its own), the FUSE mount
used with ls/cat/echo by that user, a guest that mounts its view over its
channel.  Runs the environment scripts/install-deps makes from Debian's
/usr/bin/python3 (the default python3 may be unreadable to other users),
with this checkout's packages first on PYTHONPATH."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from cloudfs.drivers.qemu import QemuDriver
from cloudfs.imagestore import install_image
from mountd.zkserver import free_port

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parents[2]
USER_VENV = Path(os.environ.get("CLOUDFS_USER_VENV", "/opt/cloudfs/venv"))
USER = "nobody"

#: The operator's session, as the user: fork, user-data, exec, a blocked cat
#: of what the guest writes, kill.  Prints what the test checks.
SESSION = r"""
set -e
M=$1
ls -ln $M $M/proc/1 | awk 'NF > 3 {print "owner", $3, $4, $NF}'
exec 3<>$M/proc/1/ctl; echo fork >&3; read pid <&3; exec 3<&-
echo "pid $pid"
printf 'echo hello from $CLOUDFS_PID > /cloud/proc/self/env/greeting\ncat /cloud/proc/self/env/quit\n' > $M/proc/$pid/userdata
echo "exec tiny" > $M/proc/$pid/ctl
echo "greeting $(timeout 120 cat $M/proc/$pid/env/greeting)"
echo "state $(awk '$1 == "state" {print $2}' $M/proc/$pid/status)"
echo 0 > $M/proc/$pid/env/quit
echo "wait $(timeout 120 cat $M/proc/1/wait)"
"""


def _as_user(argv: list[str], **kw) -> subprocess.Popen:
    """``argv`` as USER (setpriv(1) execs it: the Popen is the user's process)."""
    pw = pwd.getpwnam(USER)
    return subprocess.Popen(["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--"]
                            + argv, **kw)


@pytest.fixture
def home(tiny_image):
    """A directory of the user's: this checkout's packages, a state dir with
    the tiny image, a mount point."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    assert (USER_VENV / "bin" / "python").exists(), f"{USER_VENV} is missing: run scripts/install-deps"
    pw = pwd.getpwnam(USER)
    d = Path(tempfile.mkdtemp(prefix="cloudfs-rootless-", dir="/tmp"))
    try:
        for pkg in ("cloudfs", "ninep", "mountd"):
            shutil.copytree(REPO / pkg, d / "src" / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        install_image(d / "state", tiny_image)
        (d / "mnt").mkdir()
        for p in [d, *d.rglob("*")]:
            os.lchown(p, pw.pw_uid, pw.pw_gid)
        os.chmod(d / "state", 0o700)
        yield d
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(d / "mnt")], capture_output=True)
        QemuDriver(d / "state", accel="tcg").kill_all()
        shutil.rmtree(d, ignore_errors=True)


def test_cloudfs_up_as_a_user(home):
    pw = pwd.getpwnam(USER)
    log = open(home / "up.log", "wb")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(home / "src"), "HOME": str(home)}
    port = free_port()
    up = _as_user([str(USER_VENV / "bin" / "python"), "-m", "mountd.cli", "up", "--state-dir", str(home / "state"),
                   "--mount", str(home / "mnt"), "--listen", f"tcp!127.0.0.1!{port}"],
                  env=env, stdout=log, stderr=subprocess.STDOUT, cwd=home)
    try:
        deadline = time.monotonic() + 60
        while b"cloudfs up:" not in (home / "up.log").read_bytes():
            assert up.poll() is None and time.monotonic() < deadline, (home / "up.log").read_text()
            time.sleep(0.1)
        assert os.stat(f"/proc/{up.pid}").st_uid == pw.pw_uid
        session = _as_user(["sh", "-c", SESSION, "sh", str(home / "mnt")], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
        out = session.communicate(timeout=300)[0].decode()
        assert session.returncode == 0, out + (home / "up.log").read_text()[-3000:]
        lines = out.splitlines()
        owners = {tuple(line.split()[1:3]) for line in lines if line.startswith("owner")}
        assert owners == {(str(pw.pw_uid), str(pw.pw_gid))}, out  # every file is the user's
        pid = int(next(line.split()[1] for line in lines if line.startswith("pid ")))
        assert f"greeting hello from {pid}" in lines, out
        assert "state running" in lines, out
        assert any(line.startswith(f"wait {pid} ") and "exit 0" in line for line in lines), out
        qemus = subprocess.run(["pgrep", "-f", f"qemu-system.*{home / 'state'}"], capture_output=True)
        assert qemus.stdout == b""  # the VM ended with its process
    finally:
        up.terminate()
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        log.close()
    assert b"Traceback" not in (home / "up.log").read_bytes()
