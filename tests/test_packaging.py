"""The built wheel is a working install of cloudfs, without the source tree.

Guards against packaging regressions that the editable install used by the
rest of the suite (and by developers) hides: a package list in pyproject.toml
that leaves out a subpackage (it once named only ``ninep``, ``cloudfs`` and
``mountd``, so wheels lacked ``cloudfs.drivers`` and ``cloudfs up`` died with
ModuleNotFoundError), a wheel that ships ``tests/``, or a broken console
script.

The test builds a wheel of a copy of the checkout (``pip wheel --no-deps
--no-build-isolation`` with this interpreter, so its setuptools must be able
to build wheels), checks its file list, installs it with ``--no-deps
--no-index`` into a fresh venv that sees the dependencies (trio, kazoo, …)
through a ``.pth`` line naming this venv's site-packages (a path line only
appends that directory: the ``.pth`` files in it, such as the editable
install's finder, are not run), and then, from a temporary working directory
with PYTHONPATH unset, runs that venv's ``cloudfs --help``, ``cloudfs up
--help`` and ``cloudfs up --driver fake`` against the session's ZooKeeper
until SIGTERM.  Every process it starts is killed in a ``finally``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]

#: What the wheel must contain (a subpackage, a driver, the CLI, the 9P server).
REQUIRED = ["cloudfs/drivers/__init__.py", "cloudfs/drivers/qemu.py", "mountd/cli.py", "ninep/server.py"]

#: Not copied into the build tree: VCS, venvs, caches and earlier build output
#: (setuptools would put stale files of build/lib into the new wheel).
_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                 ".hypothesis", ".pytest_cache", ".state", ".cache")


def _env() -> dict[str, str]:
    """The environment of every child: no PYTHONPATH or other venv leaking in."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(cmd: list, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _build_wheel(work: Path) -> Path:
    """A wheel of a copy of the checkout, built with this interpreter's setuptools."""
    src = work / "src"
    shutil.copytree(REPO, src, ignore=_IGNORE, symlinks=True)
    out = work / "wheels"
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out, src], cwd=work)
    if r.returncode != 0 and "invalid command 'bdist_wheel'" in r.stdout + r.stderr:
        raise AssertionError(
            f"{sys.executable} cannot build wheels without build isolation: its setuptools has no "
            "bdist_wheel (setuptools < 70.1 needs the 'wheel' package; scripts/install-deps should "
            "install 'wheel' or upgrade setuptools in .venv)\n" + r.stderr[-2000:])
    assert r.returncode == 0, f"pip wheel failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    wheels = list(out.glob("cloudfs-*.whl"))
    assert len(wheels) == 1, f"expected one cloudfs wheel in {out}: {sorted(out.iterdir())}"
    return wheels[0]


def _fresh_venv(work: Path, wheel: Path, deps: Path) -> Path:
    """A new venv with the wheel installed and ``deps`` appended to its sys.path."""
    venv = work / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    r = _run([base, "-m", "venv", "--without-pip", venv], cwd=work)
    assert r.returncode == 0, f"venv creation failed:\n{r.stderr}"
    py = venv / "bin" / "python"
    r = _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", wheel], cwd=work)
    assert r.returncode == 0, f"pip install of the wheel failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    r = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=work)
    assert r.returncode == 0, r.stderr
    (Path(r.stdout.strip()) / "_cloudfs_test_deps.pth").write_text(f"{deps}\n")
    return venv


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> str:
    """The contents of ``path`` once they contain ``text`` (AssertionError on exit or timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        log = path.read_text(errors="replace") if path.exists() else ""
        if text in log:
            return log
        if proc.poll() is not None:
            raise AssertionError(f"cloudfs up exited {proc.returncode} before logging {text!r}:\n{log}")
        if time.monotonic() > deadline:
            raise AssertionError(f"cloudfs up logged no {text!r} within {timeout} s:\n{log}")
        time.sleep(0.1)


def test_wheel_installs_and_runs(tmp_path, zookeeper):
    work = tmp_path
    wheel = _build_wheel(work)

    names = zipfile.ZipFile(wheel).namelist()
    missing = [n for n in REQUIRED if n not in names]
    assert not missing, f"{wheel.name} lacks {missing}; it has {sorted(names)}"
    stray = [n for n in names if n.split("/")[0] in ("tests", "bench", "scripts", "examples", "docs")]
    assert not stray, f"{wheel.name} ships non-package files: {stray}"
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"ninep", "cloudfs", "mountd"}, f"unexpected top-level entries in {wheel.name}: {tops}"

    # The directory the dependencies come from (this venv's site-packages).
    deps = Path(trio.__file__).resolve().parents[1]
    venv = _fresh_venv(work, wheel, deps)
    py, cli = venv / "bin" / "python", venv / "bin" / "cloudfs"
    run_dir = work / "cwd"  # never the repo: '' on sys.path must not find the sources
    run_dir.mkdir()

    # The project's modules come from the fresh venv, the dependencies from `deps`.
    r = _run([py, "-c", "import json, cloudfs, cloudfs.drivers.fake, mountd.cli, ninep.server, trio, kazoo; "
                        "print(json.dumps([m.__file__ for m in (cloudfs, cloudfs.drivers.fake, mountd.cli, "
                        "ninep.server, trio, kazoo)]))"], cwd=run_dir)
    assert r.returncode == 0, f"imports failed in the fresh venv:\n{r.stderr}"
    *ours, trio_file, kazoo_file = [Path(f).resolve() for f in json.loads(r.stdout)]
    for f in ours:
        assert f.is_relative_to(venv.resolve()), f"{f} was imported from outside the fresh venv {venv}"
        assert not f.is_relative_to(REPO), f"{f} was imported from the source tree"
    assert trio_file.is_relative_to(deps) and kazoo_file.is_relative_to(deps)

    # a. the console script and its commands
    r = _run([cli, "--help"], cwd=run_dir)
    assert r.returncode == 0, f"cloudfs --help exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    for cmd in ("up", "ps", "import", "image"):
        assert re.search(rf"^\s+{cmd}\s", r.stdout, re.M), f"cloudfs --help does not list {cmd!r}:\n{r.stdout}"
    r = _run([cli, "up", "--help"], cwd=run_dir)
    assert r.returncode == 0, f"cloudfs up --help exited {r.returncode}:\n{r.stdout}\n{r.stderr}"

    # b. the daemon with the fake driver comes up and stops cleanly on SIGTERM
    log = work / "up.log"
    cmd = [str(c) for c in (cli, "up", "--driver", "fake", "--zookeeper", zookeeper.hosts,
                            "--deployment", f"packaging-{uuid.uuid4().hex[:12]}", "--state-dir", work / "state",
                            "--listen", "tcp!127.0.0.1!0")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=run_dir, env=_env(), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        text = _wait_for(log, "cloudfs up: 9P on", proc, timeout=60)
        assert "driver fake" in text, text
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"cloudfs up did not exit within 30 s of SIGTERM:\n{log.read_text()}") from None
        assert rc == 0, f"cloudfs up exited {rc} on SIGTERM:\n{log.read_text()}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
