"""diod's own client tools (Debian diod 1.0.24) against ``python -m ninep serve``.

The server runs as a subprocess on a free loopback port; every test stops it
(SIGTERM, then SIGKILL) even when it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("diodls", "diodcat", "diodload", "dioddate")
CTL_FILES = ["version", "date", "zero", "zero100", "null", "null100", "meminfo", "net.rpc.nfs", "exports",
             "connections"]


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    assert path, f"{name} not installed (Debian package diod; see scripts/install-deps)"
    return path


class Served:
    """A running ``python -m ninep serve``: its process, dial string, diod-style server spec."""

    def __init__(self, proc: subprocess.Popen, dial: str, log: Path, root: Path):
        self.proc, self.dial, self.log, self.root = proc, dial, log, root
        kind, rest = dial.split("!", 1)
        self.server = rest.replace("!", ":") if kind == "tcp" else rest

    def run(self, name: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a diod tool against this server; returns the completed process (text).
        A tool that hangs fails the test with the server's log attached."""
        try:
            return subprocess.run([tool(name), "-s", self.server, *args], capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"{name} {' '.join(args)} hung; server log:\n{self.log.read_text()[-4000:]}") from e


def start_server(root: Path, listen: str, log: Path, *extra: str) -> Served:
    """Start the server and wait (≤ 20 s) until it logs its address."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ninep", "serve", "--listen", listen, "--root", str(root), *extra],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            m = re.search(r"listening on ((?:tcp|unix)!\S+)", log.read_text())
            if m:
                return Served(proc, m.group(1), log, root)
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"server did not start:\n{log.read_text()}")
    except BaseException:
        stop(proc)
        raise


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM, then SIGKILL after 10 s; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@pytest.fixture
def export(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    root.mkdir()
    (root / "hello.txt").write_text("hello, world\n")
    (root / "sub").mkdir()
    (root / "sub" / "deep.txt").write_bytes(b"x" * 200_000)
    return root


@pytest.fixture
def served(export: Path, tmp_path: Path):
    s = start_server(export, "tcp!127.0.0.1!0", tmp_path / "server.log")
    try:
        yield s
    finally:
        stop(s.proc)


def ok(cp: subprocess.CompletedProcess) -> str:
    assert cp.returncode == 0, f"rc={cp.returncode}\nstdout={cp.stdout}\nstderr={cp.stderr}"
    return cp.stdout


def test_diodls_ctl(served):
    assert ok(served.run("diodls")).split() == CTL_FILES
    assert ok(served.run("diodls", "-a", "ctl")).split() == CTL_FILES


def test_diodls_export(served, export):
    assert sorted(ok(served.run("diodls", "-a", str(export))).split()) == ["hello.txt", "sub"]
    assert ok(served.run("diodls", "-a", str(export), "sub")).split() == ["deep.txt"]
    assert ok(served.run("diodls", "-a", str(export / "sub"))).split() == ["deep.txt"]
    # a plain file is printed by name (npc_opendir fails with ENOTDIR)
    assert ok(served.run("diodls", "-a", str(export), "hello.txt")).split() == ["hello.txt"]
    bad = served.run("diodls", "-a", str(export.parent))
    assert bad.returncode != 0 and "No such file or directory" in bad.stderr


def test_diodls_long_walks_from_the_open_directory(served, export):
    # diodls -l walks each entry from the open directory fid (allowed into a new fid)
    out = ok(served.run("diodls", "-l", "-a", str(export)))
    lines = {line.split()[-1]: line for line in out.splitlines()}
    assert set(lines) == {"hello.txt", "sub"}
    assert lines["sub"].startswith("d") and " 13 " in lines["hello.txt"]


def test_diodcat(served, export):
    assert ok(served.run("diodcat", "version")) == "cloudfs-ninep-0.1.0\n"
    assert ok(served.run("diodcat", "exports")) == f"{export} - - -\nctl - - -\n"
    assert ok(served.run("diodcat", "null")) == ""
    assert ok(served.run("diodcat", "meminfo")).startswith("MemTotal:")
    conns = ok(served.run("diodcat", "connections")).splitlines()
    assert len(conns) == 1 and conns[0].startswith("tcp!127.0.0.1!")
    assert ok(served.run("diodcat", "-a", str(export), "hello.txt")) == "hello, world\n"
    assert ok(served.run("diodcat", "-a", str(export), "sub/deep.txt")) == "x" * 200_000
    assert ok(served.run("diodcat", "-a", str(export), "hello.txt", "hello.txt")) == "hello, world\n" * 2
    missing = served.run("diodcat", "-a", str(export), "nope")
    assert missing.returncode != 0 and "No such file or directory" in missing.stderr


def test_diodcat_zero_is_endless(served):
    p = subprocess.Popen([tool("diodcat"), "-s", served.server, "zero"], stdout=subprocess.PIPE)
    try:
        data = p.stdout.read(300_000)
        assert data == bytes(300_000)
    finally:
        p.kill()
        p.wait()


def test_dioddate(served):
    out = ok(served.run("dioddate"))
    when = time.mktime(time.strptime(out.strip(), "%a %b %d %H:%M:%S %Y"))
    assert abs(when - time.time()) < 5


def test_symlinks_and_dotdot_stay_inside(served, export, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_text("s3cret\n")
    os.symlink(secret, export / "out")
    for path in ["../secret/key", "out/key", "../../secret/key"]:
        cp = served.run("diodcat", "-a", str(export), path)
        assert cp.returncode != 0 and "s3cret" not in cp.stdout, path
    cp = served.run("diodcat", "-a", str(secret), "key")
    assert cp.returncode != 0 and "s3cret" not in cp.stdout
    # ".." at the root is the root (walk(5))
    assert sorted(ok(served.run("diodls", "-a", str(export), "..")).split()) == ["hello.txt", "out", "sub"]


def _load_numbers(cp: subprocess.CompletedProcess) -> tuple[int, int, int]:
    text = cp.stdout + cp.stderr
    assert cp.returncode == 0, text
    m = re.search(r"(\d+) ops/s, (\d+) rMB/s, (\d+) wMB/s", text)
    assert m, text
    # diodload prints nothing else unless a thread failed
    assert text.strip().count("\n") == 0, text
    return int(m[1]), int(m[2]), int(m[3])


# diodload runs until time(NULL) passes start + runtime (whole seconds), in
# steps of 100 operations per thread, then divides by runtime: with -r 2 it
# runs 1–2 s and reports at least 50 ops/s per thread.

def test_diodload_getattr(served):
    ops, r, w = _load_numbers(served.run("diodload", "-g", "-n", "1", "-r", "2"))
    assert ops >= 50 and r == 0 and w == 0


def test_diodload_getattr_threads(served):
    ops, _, _ = _load_numbers(served.run("diodload", "-g", "-n", "4", "-r", "2"))
    assert ops >= 200


def test_diodload_read_write(served):
    # each op reads and writes msize (64 KiB) bytes: 2 threads × 100 ops ≥ 6 MB in ≤ 2 s
    ops, r, w = _load_numbers(served.run("diodload", "-n", "2", "-r", "2"))
    assert ops >= 100 and r >= 3 and w >= 3


def test_unix_socket_and_small_msize(export, tmp_path):
    sock = tmp_path / "ninep.sock"
    s = start_server(export, f"unix!{sock}", tmp_path / "unix.log", "--msize", "8192")
    try:
        assert s.dial == f"unix!{sock}"
        assert ok(s.run("diodls")).split() == CTL_FILES
        assert ok(s.run("diodcat", "-a", str(export), "sub/deep.txt")) == "x" * 200_000
        ops, r, w = _load_numbers(s.run("diodload", "-n", "1", "-r", "1"))
        assert ops >= 100
    finally:
        stop(s.proc)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_exits_cleanly_on_signal(export, tmp_path, sig):
    s = start_server(export, "tcp!127.0.0.1!0", tmp_path / "sig.log")
    try:
        ok(s.run("diodls"))
        s.proc.send_signal(sig)
        assert s.proc.wait(10) == 0, s.log.read_text()
        assert "Traceback" not in s.log.read_text()
    finally:
        stop(s.proc)


def test_bad_arguments(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ninep", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=30)

    h = run("serve", "--help")
    assert h.returncode == 0 and "--listen DIAL" in h.stdout and "--debug-9p" in h.stdout
    assert run("serve", "--listen", "tcp!127.0.0.1!0").returncode == 2
    assert run("serve", "--listen", "tcp!127.0.0.1!0", "--root", str(tmp_path / "nope")).returncode == 2
    bad = run("serve", "--listen", "carrier-pigeon!x", "--root", str(tmp_path))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
