"""The workload: concurrent 9P clients on every daemon of a cluster, each
operation recorded in a History (tests.cluster.history).

Per daemon, ``clients`` clients loop until the phase ends; each first forks a
*home* process of its own under init, then picks at random:

- fork (of init, or of home: the child is the client's to exec and kill),
- exec ``tiny`` of one of its children (the reconciler makes a server),
- kill of one of its children, then a blocking read of home's ``wait``,
- a write of a unique value to one of its three keys ``/proc/1/env/c<N>k<i>``,
- an O_NONBLOCK read of any client's key,
- ``ls /proc``.

Two *blockers* run beside them: a blocking read of a fresh key on one
daemon, released a moment later by a write on another (retried until
acknowledged).  Every operation is one 9P connection to the daemon's
operator socket with a deadline (``OP_DEADLINE``; blocked reads and waits
longer): no client state outlives a fault.
"""

from __future__ import annotations

import errno
import os
import random

import trio

from ninep.client import Client, open_client
from ninep.errors import FsError

from .history import FAIL, OK, History, Op

#: Seconds an ordinary operation may take before it is recorded unknown.
OP_DEADLINE = 15.0
#: Seconds a wait read may block (the kill's reconciler work may wait out a fault).
WAIT_DEADLINE = 40.0


class Workload:
    """The clients of one phase.  ``socket(i)`` gives daemon ``i``'s dial
    string; ``daemons`` the daemon numbers; ``stop_at`` the history time at
    which clients stop starting operations; ``block_deadline`` the history
    time by which a blocked read must have returned."""

    def __init__(self, history: History, phase: str, socket, daemons: list[int], *, clients: int = 3,
                 stop_at: float, block_deadline: float, seed: int | None = None):
        self.h, self.phase, self.socket, self.daemons = history, phase, socket, daemons
        self.clients = clients
        self.stop_at, self.block_deadline = stop_at, block_deadline
        self.rng = random.Random(seed)
        self.keys: list[str] = []
        self._seq = 0

    def _unique(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}-{self._seq}"

    async def attempt(self, kind: str, daemon: int, client: int, fn, deadline: float = OP_DEADLINE,
                      **args) -> Op:
        """Run ``fn(client, op)`` on a fresh connection to ``daemon``, recorded as
        one operation: ok with its value, fail with the errno (``connect: …``
        when no connection was made: certainly not applied), unknown when the
        deadline passed or the connection died after it was made."""
        op = self.h.begin(self.phase, kind, daemon, client, **args)
        c: Client | None = None
        died = False  # the connection broke while the operation ran
        try:
            with trio.fail_after(deadline):
                async with open_client(self.socket(daemon), flush_timeout=1.0) as c:
                    try:
                        value = await fn(c, op)
                    except BaseException:
                        died = c.closed
                        raise
            self.h.ok(op, value)
        except trio.TooSlowError:
            self.h.unknown(op, "deadline")
        except FsError as e:
            if c is None:
                self.h.fail(op, e.errno, f"connect: {e}")
            elif died:
                self.h.unknown(op, f"connection: {e}")
            else:
                self.h.fail(op, e.errno, str(e))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            if c is None:
                self.h.fail(op, getattr(e, "errno", None) or errno.ECONNREFUSED, f"connect: {e}")
            else:
                self.h.unknown(op, f"connection: {e!r}")
        return op

    # ---- the operations -------------------------------------------------------------

    @staticmethod
    async def _ctl(c: Client, pid: int, command: str) -> str:
        async with await c.walk(f"proc/{pid}/ctl") as f:
            await f.open(os.O_RDWR)
            await f.write(0, command.encode() + b"\n")
            return (await f.read_all()).decode()

    async def fork(self, d: int, n: int, parent: int) -> Op:
        async def fn(c, op):
            return int(await self._ctl(c, parent, "fork"))
        return await self.attempt("fork", d, n, fn, parent=parent)

    async def exec(self, d: int, n: int, pid: int) -> Op:
        return await self.attempt("exec", d, n, lambda c, op: self._ctl(c, pid, "exec tiny"), pid=pid)

    async def kill(self, d: int, n: int, pid: int) -> Op:
        return await self.attempt("kill", d, n, lambda c, op: self._ctl(c, pid, "kill"), pid=pid)

    async def wait(self, d: int, n: int, parent: int) -> Op:
        async def fn(c, op):
            return (await c.read_file(f"proc/{parent}/wait")).decode().strip()
        return await self.attempt("wait", d, n, fn, WAIT_DEADLINE, parent=parent)

    async def write(self, d: int, n: int, key: str, value: str, kind: str = "write", **args) -> Op:
        async def fn(c, op):
            await c.write_file(f"proc/1/env/{key}", value.encode())
        return await self.attempt(kind, d, n, fn, key=key, value=value, **args)

    async def read(self, d: int, n: int, key: str) -> Op:
        async def fn(c, op):
            async with await c.walk(f"proc/1/env/{key}") as f:
                await f.open(os.O_RDONLY | os.O_NONBLOCK)
                return (await f.read_all()).decode()
        return await self.attempt("read", d, n, fn, key=key)

    async def ls(self, d: int, n: int) -> Op:
        async def fn(c, op):
            return sorted(int(p) for p in await c.listdir("proc") if p.isdigit())
        return await self.attempt("ls", d, n, fn)

    # ---- clients ---------------------------------------------------------------------

    async def client(self, d: int, n: int) -> None:
        rng = random.Random(self.rng.random())
        home = None
        while home is None and self.h.now() < self.stop_at:
            op = await self.fork(d, n, 1)
            if op.outcome == OK:
                home = op.value
            else:
                await trio.sleep(0.5)
        mine: list[int] = []  # children of home not killed
        fresh: list[int] = []  # of those, not exec'd
        my_keys = [f"c{n}k{i}" for i in range(3)]
        while self.h.now() < self.stop_at:
            r = rng.random()
            if r < 0.2:
                parent = 1 if rng.random() < 0.3 else home
                op = await self.fork(d, n, parent)
                if op.outcome == OK and parent == home:
                    mine.append(op.value)
                    fresh.append(op.value)
            elif r < 0.3 and fresh:
                pid = fresh.pop(rng.randrange(len(fresh)))
                await self.exec(d, n, pid)
            elif r < 0.4 and mine:
                pid = mine.pop(rng.randrange(len(mine)))
                if pid in fresh:
                    fresh.remove(pid)
                op = await self.kill(d, n, pid)
                if op.outcome == OK:
                    await self.wait(d, n, home)
            elif r < 0.65:
                key = rng.choice(my_keys)
                if key not in self.keys:
                    self.keys.append(key)
                await self.write(d, n, key, self._unique(f"c{n}"))
            elif r < 0.9 and self.keys:
                await self.read(rng.choice(self.daemons), n, rng.choice(self.keys))
            else:
                await self.ls(d, n)
            await trio.sleep(rng.uniform(0.01, 0.05))

    async def blocker(self, n: int) -> None:
        """Blocked reads released from another daemon, one at a time."""
        rng = random.Random(self.rng.random())
        while self.h.now() < self.stop_at:
            key = self._unique(f"b{n}").replace("-", "")
            reader, writer = rng.sample(self.daemons, 2) if len(self.daemons) > 1 else (self.daemons[0],) * 2
            value = self._unique(f"release-{key}")
            done = trio.Event()
            ops: list[Op] = []

            async def block():
                async def fn(c, op):
                    async with await c.walk(f"proc/1/env/{key}") as f:
                        await f.open(os.O_RDONLY)
                        op.args["blocked"] = True  # opened: from here the read waits for the value
                        return (await f.read_all()).decode()
                op = await self.attempt("block", reader, n, fn, max(1.0, self.block_deadline - self.h.now()),
                                        key=key, blocked=False)
                if op.outcome != OK and op.message.startswith(("connection", "connect")):
                    op.args["interrupted"] = True  # its daemon died under it
                ops.append(op)
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(block)
                await trio.sleep(rng.uniform(0.3, 1.5))
                while True:  # the same value every time: a repeat is harmless
                    op = await self.write(writer, n, key, value, kind="release")
                    if op.outcome == OK:
                        break
                    if op.outcome == FAIL and op.message.startswith("connect"):
                        writer = rng.choice([x for x in self.daemons if x != reader] or self.daemons)
                    await trio.sleep(0.3)
                await done.wait()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for d in self.daemons:
                for i in range(self.clients):
                    nursery.start_soon(self.client, d, d * 100 + i)
            for b in range(2):
                nursery.start_soon(self.blocker, b)
