"""``cloudfs ps``: the process table, read from the namespace like any client.

It reads ``/proc``, ``/proc/<pid>/status`` (docs/namespace.md) either from a
mounted tree (``--mount DIR``: plain file reads) or over 9P (``--server
DIAL``; default the operator socket of ``--state-dir``).  Output is a table
(PID PPID NAME STATE IMAGE HOST) or, with ``--tree``, the process tree as
pstree(1) draws it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from ninep.client import open_client
from ninep.errors import FsError

COLUMNS = ("pid", "ppid", "name", "state", "image", "host")


@dataclass(frozen=True)
class Proc:
    """One row: the status fields ``cloudfs ps`` shows (``-`` when empty)."""

    pid: int
    ppid: int
    name: str
    state: str
    image: str
    host: str


def parse_status(text: str) -> dict[str, str]:
    """``key value`` lines of a status file into a dict (value may contain spaces)."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key:
            out[key] = value.strip()
    return out


async def collect(listdir: Callable[[str], Awaitable[list[str]]],
                  read: Callable[[str], Awaitable[bytes]]) -> list[Proc]:
    """The live processes, by pid; processes that end while being read are skipped."""
    procs = []
    for name in await listdir("proc"):
        if not name.isdigit():
            continue
        try:
            st = parse_status((await read(f"proc/{name}/status")).decode())
        except FsError as e:
            if e.errno == errno.ENOENT:
                continue
            raise
        procs.append(Proc(int(st.get("pid", name)), int(st.get("ppid", "0") or 0), st.get("name", "-"),
                          st.get("state", "-"), st.get("image", "-"), st.get("host", "-")))
    return sorted(procs, key=lambda p: p.pid)


def format_table(procs: list[Proc]) -> str:
    """A left-aligned table with a header line."""
    rows = [[c.upper() for c in COLUMNS]] + [[str(getattr(p, c)) for c in COLUMNS] for p in procs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() + "\n" for r in rows)


def format_tree(procs: list[Proc]) -> str:
    """The process tree, children under parents (pstree style), one process a line:
    ``<pid> <name> [<state>] <image>``."""
    by_pid = {p.pid: p for p in procs}
    kids: dict[int, list[Proc]] = {}
    roots = []
    for p in procs:
        if p.ppid in by_pid:
            kids.setdefault(p.ppid, []).append(p)
        else:
            roots.append(p)
    lines: list[str] = []

    def label(p: Proc) -> str:
        return f"{p.pid} {p.name} [{p.state}]" + (f" {p.image}" if p.image not in ("", "-") else "")

    def walk(p: Proc, prefix: str, last: bool, top: bool) -> None:
        lines.append(label(p) if top else f"{prefix}{'└─ ' if last else '├─ '}{label(p)}")
        children = kids.get(p.pid, [])
        for i, k in enumerate(children):
            walk(k, prefix if top else prefix + ("   " if last else "│  "), i == len(children) - 1, False)

    for r in roots:
        walk(r, "", True, True)
    return "".join(line + "\n" for line in lines)


async def ps(*, mount: Path | None = None, server: str | None = None, tree: bool = False) -> str:
    """The ``cloudfs ps`` output, from a mounted tree or a 9P server.
    Raises FsError / OSError when the namespace cannot be read."""
    if mount is not None:
        async def listdir(path: str) -> list[str]:
            return os.listdir(mount / path)

        async def read(path: str) -> bytes:
            try:
                return (mount / path).read_bytes()
            except OSError as e:
                raise FsError(e.errno or errno.EIO, str(e)) from None

        procs = await collect(listdir, read)
    else:
        assert server is not None
        async with open_client(server) as c:
            procs = await collect(c.listdir, c.read_file)
    return format_tree(procs) if tree else format_table(procs)
