"""The history of a cluster run, as Jepsen keeps one: every operation with
its start and end (seconds since the run began), daemon, client,
arguments and outcome.

Outcomes: ``ok`` (with the value returned), ``fail`` (with the errno the
daemon answered), ``unknown`` (no answer: the deadline passed, or the
connection died after the request was sent).  A ``fail`` with EAGAIN or EIO
is indeterminate for a write: the store answers so when ZooKeeper did not
confirm, which includes "applied, but the answer was lost"
(cloudfs.store); :meth:`Op.may_have_happened` says which operations may
have taken effect.
"""

from __future__ import annotations

import errno
import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Any

#: Errnos after which a write may or may not have been applied.
INDETERMINATE = frozenset({errno.EAGAIN, errno.EIO, errno.ETIMEDOUT})

OK, FAIL, UNKNOWN = "ok", "fail", "unknown"


@dataclass
class Op:
    """One operation.  ``kind``: fork (args parent; value the pid), exec
    (pid), kill (pid), wait (parent; value the record line), write (key,
    value), read (key; value the bytes read as text), block (key; a blocked
    read; value what released it), release (key, value; the write that
    releases a block), ls (value the pids listed)."""

    id: int
    phase: str
    kind: str
    daemon: int
    client: int
    args: dict[str, Any]
    start: float
    end: float | None = None
    outcome: str = UNKNOWN
    value: Any = None
    errno: int | None = None
    message: str = ""

    def may_have_happened(self) -> bool:
        """True unless the operation certainly took no effect."""
        return self.outcome == OK or self.outcome == UNKNOWN or self.errno in INDETERMINATE

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class History:
    """The operations of a run, in the order they began."""

    t0: float = field(default_factory=time.monotonic)
    ops: list[Op] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=itertools.count)

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 4)

    def begin(self, phase: str, kind: str, daemon: int, client: int, **args: Any) -> Op:
        op = Op(next(self._ids), phase, kind, daemon, client, args, self.now())
        self.ops.append(op)
        return op

    def ok(self, op: Op, value: Any = None) -> None:
        op.end, op.outcome, op.value = self.now(), OK, value

    def fail(self, op: Op, err: int, message: str = "") -> None:
        op.end, op.outcome, op.errno, op.message = self.now(), FAIL, err, message

    def unknown(self, op: Op, why: str) -> None:
        op.end, op.outcome, op.message = self.now(), UNKNOWN, why

    def of_phase(self, phase: str) -> list[Op]:
        return [o for o in self.ops if o.phase == phase]
