"""A bounded fuzz run against ``cloudfs up``: a few thousand random and
mutated 9P frames (tests/security/fuzz9p.py) at its public TCP face, and at
its operator socket attached as a process.  The daemon must not crash, log
no traceback, keep its descriptors, and answer the canary throughout.
Longer runs: ``python -m tests.security.fuzz9p DIALSTRING --frames N``."""

from __future__ import annotations

import os

import trio

from ninep.client import open_client
from tests.security.conftest import Canary
from tests.security.fuzz9p import fuzz

FRAMES = int(os.environ.get("CLOUDFS_FUZZ_FRAMES", "3000"))


async def test_random_and_mutated_frames(daemon):
    async with open_client(daemon.operator) as op:
        async with await op.walk("proc/1/ctl") as f:
            await f.open(os.O_RDWR)
            await f.write(0, b"fork\n")
            pid = int(await f.read_all())
    fds = daemon.fds()
    canary = Canary(daemon.tcp)
    async with trio.open_nursery() as n:
        await n.start(canary.run)
        sent = await fuzz(daemon.tcp, FRAMES, seed=20261130)
        sent += await fuzz(daemon.operator, FRAMES // 3, seed=7, aname=f"proc/{pid}")
        n.cancel_scope.cancel()
    assert sent >= FRAMES
    assert daemon.alive(), daemon.log.read_text()[-3000:]
    canary.check()
    assert not daemon.tracebacks(), "\n".join(daemon.tracebacks()[:20])
    await trio.sleep(1)
    assert daemon.fds() <= fds + 8
