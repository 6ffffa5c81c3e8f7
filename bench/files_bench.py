"""/files throughput: a file of --mb MB written and read back through the
daemon, beside an anchor measured in the same run on the same machine.

Local backend (``cloudfs up --driver fake``, files in STATE/files):

- anchor: ``dd`` straight to a file in the same state directory (same disk);
- FUSE: ``dd`` to and from ``MNT/files/`` (1 MiB blocks; FUSE splits them
  into 128 KiB requests);
- 9P: writes with ``ninep.client`` on the operator socket (msize 512 KiB),
  reads with diod's ``diodcat`` (C) on the public face's read-only view.

Writes end with fsync (``conv=fsync``; sync(2) after the 9P writes), and
the page cache is dropped before each read, so the anchor goes to the disk
as the daemon does.

Swift backend (``--os-state DIR``: a control plane started by
scripts/openstack/controlplane.py, e.g. the one the tests keep with
CLOUDFS_OS_STATE): the same through FUSE with ``cloudfs up --files swift``,
beside python-swiftclient's own ``swift upload`` / ``swift download`` of
the same file to the same proxy.

MB/s per path (median of --rounds) and the daemon's CPU seconds per GB
go to bench/results/files.json; a table is printed.

    .venv/bin/python bench/files_bench.py [--mb 100] [--rounds 3] [--os-state DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "files.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass  # not root: reads may come from the page cache (said in the results)


class Daemon:
    def __init__(self, tmp: Path, extra: list[str], env: dict[str, str] | None = None):
        self.state = tmp / "state"
        self.mnt = tmp / "mnt"
        self.mnt.mkdir(exist_ok=True)
        self.port = free_port()
        self.log = tmp / "daemon.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mountd.cli", "up", "--driver", "fake", "--mount", str(self.mnt),
                 "--state-dir", str(self.state), "--listen", f"tcp!127.0.0.1!{self.port}", *extra],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 60
        while b"cloudfs up:" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not come up:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)


def timed(argv: list[str], pid: int | None = None) -> tuple[float, float]:
    """(seconds, the daemon's CPU seconds) of running ``argv``."""
    c0 = cpu_s(pid) if pid else 0.0
    t0 = time.monotonic()
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        raise RuntimeError(f"{argv[:3]} failed ({r.returncode}): {r.stderr[-2000:]}")
    return time.monotonic() - t0, (cpu_s(pid) - c0) if pid else 0.0


def dd_write(path: Path, mb: int, pid: int | None = None) -> tuple[float, float]:
    return timed(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mb}", "conv=fsync", "status=none"], pid)


def dd_read(path: Path, pid: int | None = None) -> tuple[float, float]:
    drop_caches()
    return timed(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"], pid)


def ninep_write(sock: Path, rel: str, mb: int, pid: int) -> tuple[float, float]:
    """Write ``mb`` MB to ``rel`` (below the operator's root) with ninep.client."""
    code = f"""
import os, sys, trio
sys.path.insert(0, {str(REPO)!r})
from ninep.client import open_client
async def main():
    async with open_client("unix!{sock}", msize=512 * 1024 + 24) as c:
        f = await c.walk({os.path.dirname(rel)!r})
        async with f:
            g = await f.create({os.path.basename(rel)!r}, os.O_WRONLY | os.O_TRUNC, 0o644)
            async with g:
                block = bytes(4 << 20)  # sent in Twrites of the iounit
                off = 0
                while off < {mb} << 20:
                    off += await g.write(off, block[:({mb} << 20) - off])
trio.run(main)
os.sync()  # as dd's conv=fsync: the bytes on the disk
"""
    return timed([sys.executable, "-c", code], pid)


def diodcat(port: int, rel: str, pid: int) -> tuple[float, float]:
    drop_caches()
    tool = shutil.which("diodcat") or "/usr/sbin/diodcat"
    return timed(["sh", "-c", f"{tool} -s 127.0.0.1:{port} -a '' -m 524312 {rel} > /dev/null"], pid)


def swift_cli(clouds: Path) -> list[str]:
    import yaml

    a = yaml.safe_load(clouds.read_text())["clouds"]["cloudfs"]["auth"]
    return ["swift", "--os-auth-url", a["auth_url"], "--os-username", a["username"], "--os-password",
            a["password"], "--os-project-name", a["project_name"], "--os-user-domain-name",
            a["user_domain_name"], "--os-project-domain-name", a["project_domain_name"], "--auth-version", "3"]


def mbps(mb: int, seconds: float) -> float:
    return round(mb / seconds, 1) if seconds > 0 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=100, help="file size (MB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--os-state", metavar="DIR", help="a running control plane's state dir (for Swift)")
    args = ap.parse_args()
    mb = args.mb
    runs: dict[str, list[tuple[float, float]]] = {}

    def note(key: str, got: tuple[float, float]) -> None:
        runs.setdefault(key, []).append(got)

    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        d = Daemon(Path(tmp), [])
        try:
            pid = d.proc.pid
            for _ in range(args.rounds):
                note("local dd write (anchor)", dd_write(d.state / "anchor.bin", mb))
                note("local FUSE write", dd_write(d.mnt / "files" / "big.bin", mb, pid))
                note("local dd read (anchor)", dd_read(d.state / "anchor.bin"))
                note("local FUSE read", dd_read(d.mnt / "files" / "big.bin", pid))
                note("local 9P write (ninep.client)", ninep_write(d.state / "cloudfs.sock", "files/big9.bin", mb, pid))
                note("local 9P read (diodcat)", diodcat(d.port, "files/big9.bin", pid))
                for f in ("big.bin", "big9.bin"):
                    os.unlink(d.mnt / "files" / f)
        finally:
            d.stop()
        if args.os_state:
            clouds = Path(args.os_state) / "clouds.yaml"
            env = {"OS_CLIENT_CONFIG_FILE": str(clouds)}
            container = f"cloudfs-bench-{os.getpid()}"
            s = Path(tmp) / "swift"
            s.mkdir()
            d = Daemon(s, ["--files", "swift", "--os-cloud", "cloudfs", "--files-container", container], env)
            cli = swift_cli(clouds)
            src = Path(tmp) / "src.bin"
            subprocess.run(["dd", "if=/dev/zero", f"of={src}", "bs=1M", f"count={mb}", "status=none"], check=True)
            try:
                pid = d.proc.pid
                for _ in range(args.rounds):
                    note("swift upload (anchor)", timed([*cli, "upload", "--object-name", "anchor.bin",
                                                         container + "-anchor", str(src)]))
                    note("swift FUSE write", dd_write(d.mnt / "files" / "big.bin", mb, pid))
                    note("swift download (anchor)", timed([*cli, "download", "-o", "/dev/null",
                                                           container + "-anchor", "anchor.bin"]))
                    note("swift FUSE read", dd_read(d.mnt / "files" / "big.bin", pid))
                    os.unlink(d.mnt / "files" / "big.bin")
            finally:
                d.stop()
                subprocess.run([*cli, "delete", container], capture_output=True)
                subprocess.run([*cli, "delete", container + "-anchor"], capture_output=True)

    rows = []
    for key, got in runs.items():
        secs = statistics.median(g[0] for g in got)
        cpu = statistics.median(g[1] for g in got)
        rows.append({"path": key, "mb_per_s": mbps(mb, secs), "seconds": round(secs, 3),
                     "daemon_cpu_s_per_gb": round(cpu * 1024 / mb, 2) if "anchor" not in key else None})
    by = {r["path"]: r for r in rows}
    ratios = {}
    for backend, anchor_w, anchor_r in (("local", "local dd write (anchor)", "local dd read (anchor)"),
                                        ("swift", "swift upload (anchor)", "swift download (anchor)")):
        for r in rows:
            if r["path"].startswith(backend) and "anchor" not in r["path"]:
                anchor = by.get(anchor_w if "write" in r["path"] else anchor_r)
                if anchor and anchor["mb_per_s"]:
                    ratios[r["path"]] = round(r["mb_per_s"] / anchor["mb_per_s"], 3)
    result = {"bench": "/files throughput", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "mb": mb, "rounds": args.rounds, "cpus": os.cpu_count(), "page_cache_dropped": os.geteuid() == 0,
              "rows": rows, "ratio_to_anchor": ratios,
              "samples": {k: [[round(a, 3), round(b, 3)] for a, b in v] for k, v in runs.items()}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'path':<34}{'MB/s':>9}{'× anchor':>10}{'daemon CPU s/GB':>17}")
    for r in rows:
        cpu = "" if r["daemon_cpu_s_per_gb"] is None else f"{r['daemon_cpu_s_per_gb']:.1f}"
        ratio = ratios.get(r["path"])
        print(f"{r['path']:<34}{r['mb_per_s']:>9.1f}{'' if ratio is None else format(ratio, '.2f'):>10}{cpu:>17}")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
