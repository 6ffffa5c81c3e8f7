"""``cloudfs top``: a live table of the processes and what their VMs use,
like top(1) or virt-top, read only from the namespace (``/proc``,
``/proc/<pid>/status``, ``/proc/<pid>/stats``: docs/namespace.md), so it works
on any mount, FUSE or 9P.

Each frame reads every process's status and stats (32 at a time) and shows
pid, ppid, name, state, host, CPU % (vCPU time over wall time since the
previous frame; in the first frame, since the VM started), memory (used,
else given), block and network rates (bytes/s since the previous frame; in
the first frame, averages since the VM started), sorted by one column.
``-b`` prints frames one after another (batch mode for scripts), ``-n N``
stops after N frames, ``-d S`` is the delay between frames (s).
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from ninep.client import open_client
from ninep.errors import FsError

from .ps import parse_status

#: Sort keys: column → (the row's value, descending?).
SORTS = ("cpu", "mem", "pid", "blk", "net")
_COUNTERS = ("cpu_ns", "memory_bytes", "memory_used_bytes", "block_read_bytes", "block_write_bytes",
             "net_rx_bytes", "net_tx_bytes", "uptime_s")


@dataclass(frozen=True)
class Sample:
    """One process at one time: status fields and stats counters (None: ``-``)."""

    pid: int
    ppid: int
    name: str
    state: str
    host: str
    counters: dict[str, int | None]
    at: float  # seconds (monotonic)


@dataclass(frozen=True)
class Row:
    """One line of a frame; rates in units per second, None when unknown."""

    pid: int
    ppid: int
    name: str
    state: str
    host: str
    cpu_pct: float | None
    mem: int | None
    blk_r: float | None
    blk_w: float | None
    net_rx: float | None
    net_tx: float | None


def parse_stats(text: str) -> dict[str, int | None]:
    """``key value`` lines of a stats file; ``-`` and junk are None."""
    out: dict[str, int | None] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        value = value.strip()
        out[key] = int(value) if value.isascii() and value.isdigit() else None
    return out


async def sample(listdir: Callable[[str], Awaitable[list[str]]], read: Callable[[str], Awaitable[bytes]],
                 concurrency: int = 64) -> dict[int, Sample]:
    """Every live process's status and stats now, read ``concurrency`` at a
    time; processes that end meanwhile are left out."""
    out: dict[int, Sample] = {}
    limiter = trio.CapacityLimiter(concurrency)

    async def one(name: str) -> None:
        async with limiter:
            try:
                st = parse_status((await read(f"proc/{name}/status")).decode(errors="replace"))
            except FsError:
                return  # ended meanwhile, or unreadable: not in this frame
            try:
                counters = parse_stats((await read(f"proc/{name}/stats")).decode(errors="replace"))
            except FsError:
                counters = {}  # the backend cannot tell now (e.g. Nova's diagnostics need an admin)
        pid = int(st.get("pid", name))
        out[pid] = Sample(pid, int(st.get("ppid", "0") or 0), st.get("name", "-"), st.get("state", "-"),
                          st.get("host", "-"), counters, time.monotonic())

    async with trio.open_nursery() as n:
        for name in await listdir("proc"):
            if name.isascii() and name.isdigit():
                n.start_soon(one, name)
    return out


def _rate(now: Sample, then: Sample | None, key: str, scale: float = 1.0) -> float | None:
    v = now.counters.get(key)
    if v is None:
        return None
    if then is not None and then.counters.get(key) is not None and now.at > then.at \
            and (now.counters.get("uptime_s") or 0) >= (then.counters.get("uptime_s") or 0):
        return max(0.0, (v - then.counters[key]) / (now.at - then.at)) * scale  # type: ignore[operator]
    up = now.counters.get("uptime_s")
    return v / up * scale if up else None


def rows(now: dict[int, Sample], then: dict[int, Sample]) -> list[Row]:
    """The frame for ``now``, with rates since ``then`` (or since each VM
    started, for processes not in ``then``)."""
    out = []
    for pid, s in now.items():
        prev = then.get(pid)
        cpu = _rate(s, prev, "cpu_ns", 100 / 1e9)
        mem = s.counters.get("memory_used_bytes")
        mem = mem if mem is not None else s.counters.get("memory_bytes")
        out.append(Row(pid, s.ppid, s.name, s.state, s.host, cpu, mem, _rate(s, prev, "block_read_bytes"),
                       _rate(s, prev, "block_write_bytes"), _rate(s, prev, "net_rx_bytes"),
                       _rate(s, prev, "net_tx_bytes")))
    return out


def sort_rows(rs: list[Row], key: str) -> list[Row]:
    """``rs`` by ``key`` (one of SORTS): biggest first, pid for ties."""
    def val(r: Row) -> float:
        v = {"cpu": r.cpu_pct, "mem": r.mem, "pid": -r.pid,
             "blk": (r.blk_r or 0) + (r.blk_w or 0) if r.blk_r is not None or r.blk_w is not None else None,
             "net": (r.net_rx or 0) + (r.net_tx or 0) if r.net_rx is not None or r.net_tx is not None else None}[key]
        return float("-inf") if v is None else float(v)

    return sorted(rs, key=lambda r: (-val(r), r.pid))


def _size(v: float | None) -> str:
    if v is None:
        return "-"
    for unit in ("", "K", "M", "G", "T"):
        if abs(v) < 1024 or unit == "T":
            return f"{v:.0f}{unit}" if unit == "" else f"{v:.1f}{unit}"
        v /= 1024
    return "-"


def format_frame(rs: list[Row], when: str = "") -> str:
    """A header line and one line per row, columns aligned."""
    head = ["PID", "PPID", "NAME", "STATE", "HOST", "%CPU", "MEM", "BLK_R/s", "BLK_W/s", "NET_RX/s", "NET_TX/s"]
    lines = [[str(r.pid), str(r.ppid), r.name[:16], r.state, r.host[:16],
              "-" if r.cpu_pct is None else f"{r.cpu_pct:.1f}", _size(r.mem), _size(r.blk_r), _size(r.blk_w),
              _size(r.net_rx), _size(r.net_tx)] for r in rs]
    table = [head] + lines
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    out = f"cloudfs top - {when or time.strftime('%H:%M:%S')}, {len(rs)} processes\n"
    return out + "".join("  ".join(v.rjust(w) if i in (0, 1) or i >= 5 else v.ljust(w)
                                   for i, (v, w) in enumerate(zip(row, widths))).rstrip() + "\n" for row in table)


async def top(*, mount: Path | None = None, server: str | None = None, batch: bool = False,
              iterations: int | None = None, delay: float = 1.0, sort: str = "cpu", out=sys.stdout) -> None:
    """Run ``cloudfs top`` on a mounted tree or a 9P server until
    ``iterations`` frames were shown (None: for ever).  Batch mode prints
    frames one after another; otherwise each frame replaces the screen.
    Raises FsError / OSError when the namespace cannot be read."""
    if sort not in SORTS:
        raise ValueError(f"sort by one of {', '.join(SORTS)}")

    async def run(listdir, read) -> None:
        then: dict[int, Sample] = {}
        shown = 0
        while iterations is None or shown < iterations:
            now = await sample(listdir, read)
            frame = format_frame(sort_rows(rows(now, then), sort))
            out.write(frame if batch else "\x1b[H\x1b[2J" + frame)
            if batch:
                out.write("\n")
            out.flush()
            then, shown = now, shown + 1
            if iterations is None or shown < iterations:
                await trio.sleep(delay)

    if mount is not None:
        async def listdir(path: str) -> list[str]:
            return await trio.to_thread.run_sync(os.listdir, mount / path)

        async def read(path: str) -> bytes:
            try:
                return await trio.to_thread.run_sync((mount / path).read_bytes)
            except OSError as e:
                raise FsError(e.errno or errno.EIO, str(e)) from None

        await run(listdir, read)
    else:
        assert server is not None
        async with open_client(server) as c:
            await run(c.listdir, c.read_file)
