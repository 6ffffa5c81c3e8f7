"""9P server throughput: diod's own load generator against diod and against ours.

Runs, in one session and on the same machine, Debian's ``diodload``:

- ``-g -n1``: getattr round trips on one connection (latency-bound),
- ``-g -n4``: getattr on four connections,
- ``-n4``: the default load, copying ctl:zero → ctl:null on four connections,

against ``diod`` (the anchor) and against ``python -m ninep serve``, each on a
free loopback port, alternating servers for ``--rounds`` rounds and taking each
one's median.  Writes bench/results/ninep.json and prints a table.

Target (issue "ninep"): our single-connection getattr rate ≥ 0.6 × diod's.

    .venv/bin/python bench/ninep_bench.py [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
RESULTS = REPO / "bench" / "results" / "ninep.json"
LOADS = {"getattr -n1": ["-g", "-n1"], "getattr -n4": ["-g", "-n4"], "read/write -n4": ["-n4"]}
TARGET = 0.6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port}")


def start(kind: str, export: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    if kind == "diod":
        diod = shutil.which("diod") or "/usr/sbin/diod"
        cmd = [diod, "-f", "-n", "-N", "-l", f"127.0.0.1:{port}", "-e", "ctl", "-e", str(export), "-L", "stderr"]
    else:
        cmd = [sys.executable, "-m", "ninep", "serve", "--listen", f"tcp!127.0.0.1!{port}", "--root", str(export),
               "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
    except Exception:
        proc.kill()
        raise
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def diodload(port: int, args: list[str], seconds: int) -> float:
    tool = shutil.which("diodload") or "/usr/bin/diodload"
    out = subprocess.run([tool, "-s", f"127.0.0.1:{port}", "-r", str(seconds), *args], capture_output=True,
                         text=True, timeout=seconds + 60)
    m = re.search(r"(\d+) ops/s", out.stdout + out.stderr)
    if not m:
        raise RuntimeError(f"diodload output not understood: {out.stdout!r} {out.stderr!r}")
    return float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=3, help="diodload run time per load (s)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per server")
    args = ap.parse_args()
    samples: dict[str, dict[str, list[float]]] = {k: {l: [] for l in LOADS} for k in ("diod", "ninep")}
    with tempfile.TemporaryDirectory() as tmp:
        export = Path(tmp)
        (export / "file").write_bytes(os.urandom(4096))
        for _ in range(args.rounds):
            for kind in ("diod", "ninep"):
                proc, port = start(kind, export)
                try:
                    for load, largs in LOADS.items():
                        samples[kind][load].append(diodload(port, largs, args.seconds))
                finally:
                    stop(proc)
    med = {k: {l: statistics.median(v) for l, v in d.items()} for k, d in samples.items()}
    rows = []
    for load in LOADS:
        d, n = med["diod"][load], med["ninep"][load]
        rows.append({"load": load, "diod_ops": d, "ninep_ops": n, "ratio": n / d if d else 0.0})
    result = {
        "bench": "ninep vs diod (diodload)",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": args.seconds,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "rows": rows,
        "samples": samples,
        "target": {"load": "getattr -n1", "min_ratio": TARGET},
        "target_met": rows[0]["ratio"] >= TARGET,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'load':<16}{'diod ops/s':>12}{'ninep ops/s':>13}{'ratio':>8}")
    for r in rows:
        print(f"{r['load']:<16}{r['diod_ops']:>12.0f}{r['ninep_ops']:>13.0f}{r['ratio']:>8.2f}")
    print(f"target: getattr -n1 ratio >= {TARGET}: {'met' if result['target_met'] else 'NOT met'}")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
