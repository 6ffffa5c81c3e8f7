"""The checker: what a history (tests.cluster.history) and the state after
healing must satisfy.  Pure functions over plain data; each returns a list
of anomalies (dicts with ``check``, ``detail`` and the ``ops`` involved),
the goal being none.

The rules (issue "cluster"), each one function:

- :func:`check_pids`: fork pids are unique, never reused (below the final
  ``nextpid``), and ascending in real time (a fork that began after another
  was acknowledged got a larger pid).
- :func:`check_processes`: every acknowledged fork exists afterwards or has
  a wait record (present, or consumed by a read, or possibly by a wait read
  that got no answer); no process appears that no acknowledged or
  possibly-applied fork of that parent could have made; an acknowledged
  kill leaves no process behind; no process ends but by a kill.
- :func:`check_env`: every value read was written (by a write that began
  before the read ended) and is not stale: no later write of the key was
  known (acknowledged, or its value read) on the same daemon (the same
  process of it: a restarted daemon is a new ZooKeeper client) before the
  read began, nor anywhere more than STALE_SLACK before; after healing
  every daemon reads the last acknowledged write of each key, or a later
  possibly-applied one.
- :func:`check_waits`: each wait record is consumed at most once, by a read of
  its own parent; every acknowledged kill's record is consumed or still
  waiting, not both.
- :func:`check_blocks`: every blocked read that was not interrupted (its
  connection died with its daemon) returned the value that released it.  A
  read begun around a fault may be refused with EAGAIN/EIO (its first look
  at ZooKeeper failed, before it blocked); one that had waited before the
  fault began must complete.
- :func:`check_servers`: with the fake driver, every live VM process has
  exactly one server and every server of the deployment has its process
  (no orphan, no duplicate); no work is left pending.
- :func:`check_errors`: a failed operation failed with an errno the
  documentation gives for it, EAGAIN/EIO only around a fault (while
  ZooKeeper is unreachable), never another; no operation goes unanswered
  with no fault near.
- :func:`check_listings`: ``ls /proc`` lists only pids some fork made, and not
  a process whose wait record had already been consumed (on that daemon, or
  more than STALE_SLACK before anywhere).

Keys are written by one client each, one write at a time, so each key's
writes are ordered by their start.
"""

from __future__ import annotations

import errno
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from .history import FAIL, INDETERMINATE, OK, UNKNOWN, Op


@dataclass
class Final:
    """The state after healing and convergence.  ``procs``: pid → (ppid,
    state, vm) from ZooKeeper; ``waits``: parent pid → child pids of the wait
    records not consumed; ``next_pid`` ZooKeeper's counter; ``env``: daemon →
    key → value read on that daemon (None: not set); ``servers``: (server id,
    pid) of every fake-cloud server of the deployment; ``pending``: work items
    left; ``fake_driver``: whether ``servers`` is known; ``faults`` the fault
    windows."""

    procs: dict[int, tuple[int, str, str | None]] = field(default_factory=dict)
    waits: dict[int, list[int]] = field(default_factory=dict)
    #: pid → (state, message) of each wait record in ``waits``
    ended: dict[int, tuple[str, str]] = field(default_factory=dict)
    next_pid: int = 2
    env: dict[int, dict[str, str | None]] = field(default_factory=dict)
    servers: list[tuple[str, int]] = field(default_factory=list)
    pending: int = 0
    fake_driver: bool = True
    #: (start, end) of each fault, history time
    faults: list[tuple[float, float]] = field(default_factory=list)
    #: daemon → the times it was killed (a new process, a new ZooKeeper client, came after)
    kills: dict[int, list[float]] = field(default_factory=dict)


#: Seconds around a fault in which a read may be refused before it blocked
#: (kazoo notices a dead connection within 2/3 of the session timeout).
REFUSAL_SLACK = 3.0
#: A read refused before it blocked fails within the store's suspend wait
#: plus one operation's deadline (2 + 10 s); one that fails later had waited.
REFUSAL_WITHIN = 12.0
#: Seconds after a fault healed in which EAGAIN/EIO are still expected (a
#: partitioned daemon's new session, a restarted daemon's first requests).
ERROR_SLACK = 10.0
#: How long another daemon's reads may lag an acknowledged write: cloudfs
#: reads from the ZooKeeper server its session is on, which may trail the
#: leader until it notices it lost the quorum (syncLimit 5 × tick 500 ms);
#: a daemon never reads older than what it wrote or read itself (ZooKeeper's
#: per-session order).
STALE_SLACK = 2.5


def in_fault(final: "Final", start: float, end: float, before: float = 1.0, after: float = ERROR_SLACK) -> bool:
    """Whether [start, end] meets a fault window widened by ``before``/``after``."""
    return any(start <= f_end + after and end >= f_start - before for f_start, f_end in final.faults)


def anomaly(check: str, detail: str, *ops: Op) -> dict:
    return {"check": check, "detail": detail, "ops": [o.id for o in ops]}


def _ok(ops: list[Op], kind: str) -> list[Op]:
    return [o for o in ops if o.kind == kind and o.outcome == OK]


def _wait_pid(op: Op) -> int | None:
    try:
        return int(str(op.value).split()[0])
    except (ValueError, IndexError):
        return None


def _wait_state(op: Op) -> tuple[str, str]:
    """(state, message) of a wait record line ``pid name state message``."""
    parts = str(op.value).split(" ", 3)
    return (parts[2] if len(parts) > 2 else "", parts[3] if len(parts) > 3 else "")


def _lost_waits(ops: list[Op]) -> Counter:
    """Per parent, the wait reads that may have taken a record without
    anyone seeing it (no answer, or EAGAIN/EIO after it took one)."""
    return Counter(o.args["parent"] for o in ops if o.kind == "wait" and o.outcome != OK and o.may_have_happened())


def check_pids(ops: list[Op], final: Final) -> list[dict]:
    out = []
    forks = _ok(ops, "fork")
    seen: dict[int, Op] = {}
    for o in forks:
        if not isinstance(o.value, int) or o.value <= 1:
            out.append(anomaly("pids", f"fork returned {o.value!r}", o))
        elif o.value in seen:
            out.append(anomaly("pids", f"pid {o.value} returned twice", seen[o.value], o))
        else:
            seen[o.value] = o
        if isinstance(o.value, int) and o.value >= final.next_pid:
            out.append(anomaly("pids", f"pid {o.value} not below nextpid {final.next_pid}", o))
    # real-time order: sweep forks by start, folding in those that ended before
    by_end = sorted((o for o in forks if isinstance(o.value, int)), key=lambda o: o.end)
    best: Op | None = None
    i = 0
    for o in sorted((o for o in forks if isinstance(o.value, int)), key=lambda o: o.start):
        while i < len(by_end) and by_end[i].end < o.start:
            if best is None or by_end[i].value > best.value:
                best = by_end[i]
            i += 1
        if best is not None and o.value <= best.value:
            out.append(anomaly("pids", f"pid {o.value} after pid {best.value} was acknowledged", best, o))
    return out


def check_processes(ops: list[Op], final: Final) -> list[dict]:
    out = []
    consumed = {p for p in (_wait_pid(o) for o in _ok(ops, "wait")) if p is not None}
    waiting = {c for cs in final.waits.values() for c in cs}
    acked = {o.value: o for o in _ok(ops, "fork")}
    lost = _lost_waits(ops)
    for pid, o in acked.items():
        if pid not in final.procs and pid not in waiting and pid not in consumed:
            if lost[o.args["parent"]] > 0:  # a wait read nobody heard back from may have taken its record
                lost[o.args["parent"]] -= 1
                continue
            out.append(anomaly("processes", f"acknowledged fork {pid} vanished without a wait record", o))
    # nothing ends by itself here (the fake cloud's servers never stop): every
    # wait record is of a process a kill may have ended
    killed = {o.args["pid"] for o in ops if o.kind == "kill" and o.may_have_happened()}
    records = [(_wait_pid(o), _wait_state(o), o) for o in _ok(ops, "wait")]
    records += [(pid, final.ended.get(pid, ("killed", "")), None) for pid in waiting]
    for pid, (state, message), o in records:
        if pid is not None and (pid not in killed or state != "killed"):
            out.append(anomaly("processes", f"process {pid} ended by itself: {state} {message}".rstrip(),
                               *([o] if o else [])))
    # every process that exists or ended must come from a fork that may have happened
    maybe = Counter(o.args["parent"] for o in ops if o.kind == "fork" and o.outcome != OK and o.may_have_happened())
    unexplained: Counter[int] = Counter()
    parent_of = {pid: rec[0] for pid, rec in final.procs.items()}
    for parent, kids in final.waits.items():
        for k in kids:
            parent_of.setdefault(k, parent)
    for pid, ppid in parent_of.items():
        if pid != 1 and pid not in acked:
            unexplained[ppid] += 1
    for ppid, n in unexplained.items():
        if n > maybe[ppid]:
            out.append(anomaly("processes", f"{n} processes of parent {ppid} that no fork made "
                                            f"(only {maybe[ppid]} forks of it may have)"))
    for o in _ok(ops, "kill"):
        if o.args["pid"] in final.procs:
            out.append(anomaly("processes", f"killed process {o.args['pid']} still exists "
                                            f"({final.procs[o.args['pid']][1]})", o))
    return out


def check_env(ops: list[Op], final: Final) -> list[dict]:
    out = []
    writes: dict[str, list[Op]] = defaultdict(list)
    for o in ops:
        if o.kind == "write":
            writes[o.args["key"]].append(o)
    for ws in writes.values():
        ws.sort(key=lambda o: o.start)
    # when each write was known to have happened: its acknowledgement, or
    # the end of the first read that returned its value (an unknown write
    # seen is a write done), on each daemon and anywhere
    known_on: dict[tuple[int, int, int], float] = {}
    known_any: dict[int, float] = {}

    def life(daemon: int, t: float) -> int:  # which incarnation of the daemon served at t
        return sum(1 for k in final.kills.get(daemon, ()) if k <= t)

    def learn(w: Op, daemon: int, t: float) -> None:
        at = (w.id, daemon, life(daemon, t))
        known_on[at] = min(known_on.get(at, t), t)
        known_any[w.id] = min(known_any.get(w.id, t), t)

    for w in ops:
        if w.kind == "write" and w.outcome == OK:
            learn(w, w.daemon, w.end)
    reads = sorted(_ok(ops, "read"), key=lambda o: o.end)
    index = {}
    for r in reads:
        ws = writes.get(r.args["key"], [])
        idx = next((i for i, w in enumerate(ws) if w.args["value"] == r.value), None)
        index[r.id] = idx
        if idx is not None:
            learn(ws[idx], r.daemon, r.end)
    for r in reads:
        ws, idx = writes.get(r.args["key"], []), index[r.id]
        if idx is None or not ws[idx].may_have_happened() or ws[idx].start > r.end:
            out.append(anomaly("env", f"read {r.args['key']}={r.value!r}: no write made it", r))
            continue
        later = [w for w in ws[idx + 1:]
                 if known_on.get((w.id, r.daemon, life(r.daemon, r.start)), float("inf")) < r.start
                 or known_any.get(w.id, float("inf")) < r.start - STALE_SLACK]
        if later:
            out.append(anomaly("env", f"stale read {r.args['key']}={r.value!r} after "
                                      f"{later[-1].args['value']!r} was known", r, later[-1]))
    for daemon, values in final.env.items():
        for key, ws in writes.items():
            acked = [i for i, w in enumerate(ws) if w.outcome == OK]
            first = acked[-1] if acked else None
            allowed = {w.args["value"] for i, w in enumerate(ws)
                       if (first is None or i >= first) and w.may_have_happened()}
            if first is None:
                allowed.add(None)
            got = values.get(key)
            if got not in allowed:
                last = ws[first].args["value"] if first is not None else None
                out.append(anomaly("env", f"after healing d{daemon} reads {key}={got!r}, "
                                          f"last acknowledged {last!r}"))
    return out


def check_waits(ops: list[Op], final: Final) -> list[dict]:
    out = []
    parent = {o.value: o.args["parent"] for o in _ok(ops, "fork")}
    taken: dict[int, Op] = {}
    for o in _ok(ops, "wait"):
        pid = _wait_pid(o)
        if pid is None:
            out.append(anomaly("waits", f"unparsable wait record {o.value!r}", o))
            continue
        if pid in taken:
            out.append(anomaly("waits", f"wait record of {pid} consumed twice", taken[pid], o))
        taken[pid] = o
        if pid in parent and parent[pid] != o.args["parent"]:
            out.append(anomaly("waits", f"wait record of {pid} read from {o.args['parent']}, "
                                        f"its parent is {parent[pid]}", o))
    waiting = {c: p for p, cs in final.waits.items() for c in cs}
    lost = _lost_waits(ops)
    for o in _ok(ops, "kill"):
        pid = o.args["pid"]
        if pid in taken and pid in waiting:
            out.append(anomaly("waits", f"wait record of {pid} consumed and still waiting", o, taken[pid]))
        elif pid not in taken and pid not in waiting:
            if pid in parent and lost[parent[pid]] > 0:
                lost[parent[pid]] -= 1  # a wait read nobody heard back from may have taken it
                continue
            out.append(anomaly("waits", f"killed {pid} left no wait record", o))
    return out


def check_blocks(ops: list[Op], final: Final) -> list[dict]:
    out = []
    released = {o.args["key"]: o.args["value"] for o in ops if o.kind == "release"}
    for o in ops:
        if o.kind != "block":
            continue
        if o.outcome == OK:
            if o.value != released.get(o.args["key"]):
                out.append(anomaly("blocks", f"blocked read of {o.args['key']} returned {o.value!r}, "
                                             f"released with {released.get(o.args['key'])!r}", o))
        elif o.outcome == FAIL and o.errno in INDETERMINATE and o.end - o.start <= REFUSAL_WITHIN and any(
                start - REFUSAL_SLACK <= o.start <= end + REFUSAL_SLACK for start, end in final.faults):
            continue  # refused before it could block, while ZooKeeper was away (documented)
        elif not o.args.get("interrupted"):
            out.append(anomaly("blocks", f"blocked read of {o.args['key']} never completed: "
                                         f"{o.outcome} {o.errno or ''} {o.message}".rstrip(), o))
    return out


def check_servers(ops: list[Op], final: Final) -> list[dict]:
    out = []
    if final.pending:
        out.append(anomaly("servers", f"{final.pending} work items still pending after healing"))
    if not final.fake_driver:
        return out
    by_pid: dict[int, list[str]] = defaultdict(list)
    for sid, pid in final.servers:
        by_pid[pid].append(sid)
    for pid, sids in by_pid.items():
        rec = final.procs.get(pid)
        if len(sids) > 1:
            out.append(anomaly("servers", f"process {pid} has {len(sids)} servers {sorted(sids)}"))
        if rec is None:
            out.append(anomaly("servers", f"orphan server(s) {sorted(sids)} of ended process {pid}"))
        elif rec[2] not in sids:
            out.append(anomaly("servers", f"process {pid} records server {rec[2]}, the cloud has {sorted(sids)}"))
    for pid, (_ppid, state, vm) in final.procs.items():
        if vm is not None and pid not in by_pid:
            out.append(anomaly("servers", f"process {pid} ({state}) records server {vm}, which does not exist"))
        if state == "creating":
            out.append(anomaly("servers", f"process {pid} still creating after healing"))
    return out


#: Errnos each operation may fail with besides EAGAIN/EIO (docs/namespace.md).
ALLOWED = {
    "fork": {errno.ESRCH},                 # the parent is being killed
    "exec": {errno.ESRCH},
    "kill": {errno.ESRCH},                 # already being killed
    "read": {errno.ENOENT},
    "wait": set(), "write": set(), "block": set(), "release": set(), "ls": set(),
}
#: Errnos of a connection that could not be made (the daemon was down).
CONNECT = frozenset({errno.ECONNREFUSED, errno.ENOENT})


def check_errors(ops: list[Op], final: Final) -> list[dict]:
    out = []
    for o in ops:
        if o.outcome == UNKNOWN and o.message == "deadline" and o.kind != "block" \
                and not in_fault(final, o.start, o.end):
            out.append(anomaly("errors", f"{o.kind} had no answer within its deadline, no fault near", o))
        if o.outcome != FAIL:
            continue
        if o.errno in INDETERMINATE:
            if not in_fault(final, o.start, o.end) and not (o.kind == "read" and o.errno == errno.EAGAIN):
                out.append(anomaly("errors", f"{o.kind} failed with {errno.errorcode.get(o.errno, o.errno)} "
                                             f"with no fault near: {o.message}".rstrip(), o))
            continue
        if o.message.startswith("connect") and o.errno in CONNECT and in_fault(final, o.start, o.end):
            continue
        if o.errno not in ALLOWED.get(o.kind, set()):
            out.append(anomaly("errors", f"{o.kind} failed with {errno.errorcode.get(o.errno, o.errno)} "
                                         f"{o.message}".rstrip(), o))
    return out


def check_listings(ops: list[Op], final: Final) -> list[dict]:
    out = []
    consumed = sorted(((o.end, _wait_pid(o), o) for o in _ok(ops, "wait")), key=lambda t: t[0])
    known = {1, *final.procs, *(c for cs in final.waits.values() for c in cs)}
    known |= {o.value for o in _ok(ops, "fork")} | {p for _, p, _ in consumed if p is not None}
    for o in _ok(ops, "ls"):
        listed = set(o.value)
        phantom = listed - known
        if phantom:
            out.append(anomaly("listings", f"ls /proc listed {sorted(phantom)}, which no fork made", o))
        gone = [(p, w) for end, p, w in consumed if p in listed
                and (end < o.start - STALE_SLACK
                     or (w.daemon == o.daemon and end < o.start
                         and not any(end <= k <= o.start for k in final.kills.get(o.daemon, ()))))]
        for p, w in gone:
            out.append(anomaly("listings", f"ls /proc listed {p} after its wait record was consumed", w, o))
    return out


CHECKS = (check_pids, check_processes, check_env, check_waits, check_blocks, check_servers, check_errors,
          check_listings)


def check(ops: list[Op], final: Final) -> list[dict]:
    """Every anomaly of ``ops`` (one phase's history) against ``final``."""
    out = []
    for fn in CHECKS:
        out += fn(ops, final)
    return out


def pending_ops(ops: list[Op]) -> list[Op]:
    """Operations that never ended (the run's bug, not the system's)."""
    return [o for o in ops if o.end is None and o.outcome == UNKNOWN]
