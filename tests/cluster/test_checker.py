"""tests.cluster.checker, row by row: small histories with one anomaly each
(and clean ones) give exactly the anomalies expected.  The checker is what
the cluster run trusts, so it is tested on histories whose answer is known."""

import errno

import pytest

from tests.cluster.checker import Final, check
from tests.cluster.history import FAIL, OK, UNKNOWN, Op

_ids = iter(range(10**6))


def op(kind, start, end, outcome=OK, val=None, err=None, daemon=1, message="", **args):
    return Op(next(_ids), "p", kind, daemon, 0, args, start, end, outcome, val, err, message)


def final(**kw):
    base = dict(procs={1: (0, "running", None)}, next_pid=100)
    base.update(kw)
    return Final(**base)


def procs(*pids, parent=1):
    return {1: (0, "running", None), **{p: (parent, "new", None) for p in pids}}


CASES = [
    # (name, ops, final, checks expected)
    ("clean forks", [op("fork", 0, 1, val=2, parent=1), op("fork", 2, 3, val=3, parent=1)],
     final(procs=procs(2, 3)), []),
    ("pid twice", [op("fork", 0, 1, val=2, parent=1), op("fork", 2, 3, val=2, parent=1)],
     final(procs=procs(2)), ["pids"]),
    ("pid not ascending", [op("fork", 0, 1, val=5, parent=1), op("fork", 2, 3, val=4, parent=1)],
     final(procs=procs(4, 5)), ["pids"]),
    ("concurrent forks may come in any order",
     [op("fork", 0, 3, val=5, parent=1), op("fork", 1, 2, val=4, parent=1)], final(procs=procs(4, 5)), []),
    ("pid at nextpid", [op("fork", 0, 1, val=7, parent=1)], final(procs=procs(7), next_pid=7), ["pids"]),
    ("acknowledged fork lost", [op("fork", 0, 1, val=2, parent=1)], final(), ["processes"]),
    ("unknown fork made a process", [op("fork", 0, 1, UNKNOWN, parent=1)], final(procs=procs(2)), []),
    ("EAGAIN fork may have made one", [op("fork", 0, 1, FAIL, err=errno.EAGAIN, parent=1)],
     final(procs=procs(2), faults=[(0, 5)]), []),
    ("process from nowhere", [op("fork", 0, 1, FAIL, err=errno.ESRCH, parent=1)], final(procs=procs(2)),
     ["processes"]),
    ("killed but alive", [op("fork", 0, 1, val=2, parent=1), op("kill", 2, 3, pid=2)],
     final(procs=procs(2)), ["processes", "waits"]),
    ("kill, wait record consumed", [op("fork", 0, 1, val=2, parent=1), op("kill", 2, 3, pid=2),
                                    op("wait", 3, 4, val="2 p2 killed killed", parent=1)], final(), []),
    ("kill, record still waiting", [op("fork", 0, 1, val=2, parent=1), op("kill", 2, 3, pid=2)],
     final(waits={1: [2]}), []),
    ("record consumed twice", [op("fork", 0, 1, val=2, parent=1), op("kill", 2, 3, pid=2),
                               op("wait", 3, 4, val="2 p2 killed killed", parent=1),
                               op("wait", 3, 5, val="2 p2 killed killed", parent=1)], final(), ["waits"]),
    ("record consumed and waiting", [op("fork", 0, 1, val=2, parent=1), op("kill", 2, 3, pid=2),
                                     op("wait", 3, 4, val="2 p2 killed killed", parent=1)],
     final(waits={1: [2]}), ["waits"]),
    ("record read by another parent", [op("fork", 0, 1, val=2, parent=1), op("fork", 0, 1, val=3, parent=1),
                                       op("kill", 2, 3, pid=2), op("wait", 3, 4, val="2 p2 killed", parent=3)],
     final(procs=procs(3)), ["waits"]),
    ("read of a written value", [op("write", 0, 1, key="k", value="a"), op("read", 2, 3, val="a", key="k")],
     final(env={1: {"k": "a"}}), []),
    ("read of a value never written", [op("write", 0, 1, key="k", value="a"), op("read", 2, 3, val="z", key="k")],
     final(env={1: {"k": "a"}}), ["env"]),
    ("read of a value before its write began", [op("read", 0, 1, val="a", key="k"),
                                                op("write", 2, 3, key="k", value="a")],
     final(env={1: {"k": "a"}}), ["env"]),
    ("stale read", [op("write", 0, 1, key="k", value="a"), op("write", 2, 3, key="k", value="b"),
                    op("read", 4, 5, val="a", key="k")], final(env={1: {"k": "b"}}), ["env"]),
    ("read concurrent with a write may see either",
     [op("write", 0, 1, key="k", value="a"), op("write", 2, 5, key="k", value="b"),
      op("read", 3, 4, val="a", key="k")], final(env={1: {"k": "b"}}), []),
    ("lost acknowledged write", [op("write", 0, 1, key="k", value="a"), op("write", 2, 3, key="k", value="b")],
     final(env={1: {"k": "b"}, 2: {"k": "a"}}), ["env"]),
    ("a later unknown write may win", [op("write", 0, 1, key="k", value="a"),
                                       op("write", 2, 3, UNKNOWN, key="k", value="b")],
     final(env={1: {"k": "b"}, 2: {"k": "a"}}), []),
    ("a failed write must not win", [op("write", 0, 1, key="k", value="a"),
                                     op("write", 2, 3, FAIL, err=errno.EINVAL, key="k", value="b")],
     final(env={1: {"k": "b"}}), ["env", "errors"]),
    ("block released", [op("block", 0, 5, val="v", key="b"), op("release", 1, 2, key="b", value="v")],
     final(), []),
    ("block wrong value", [op("block", 0, 5, val="w", key="b"), op("release", 1, 2, key="b", value="v")],
     final(), ["blocks"]),
    ("block never released", [op("block", 0, 90, UNKNOWN, message="deadline", key="b"),
                              op("release", 1, 2, key="b", value="v")], final(), ["blocks"]),
    ("block interrupted by its daemon's death", [op("block", 0, 3, UNKNOWN, message="connection", key="b",
                                                    interrupted=True), op("release", 1, 2, key="b", value="v")],
     final(), []),
    ("block refused during a fault", [op("block", 10, 11, FAIL, err=errno.EAGAIN, key="b"),
                                      op("release", 1, 2, key="b", value="v")], final(faults=[(9, 20)]), []),
    ("block that had waited fails in a fault", [op("block", 0, 11, FAIL, err=errno.EAGAIN, key="b"),
                                                op("release", 12, 13, key="b", value="v")],
     final(faults=[(9, 20)]), ["blocks"]),
    ("block begun in a fault that waited long, then failed", [op("block", 10, 25, FAIL, err=errno.EAGAIN, key="b"),
                                                               op("release", 12, 13, key="b", value="v")],
     final(faults=[(9, 20)]), ["blocks"]),
    ("one server per VM", [op("fork", 0, 1, val=2, parent=1)],
     final(procs={1: (0, "running", None), 2: (1, "running", "s1")}, servers=[("s1", 2)]), []),
    ("duplicate server", [op("fork", 0, 1, val=2, parent=1)],
     final(procs={1: (0, "running", None), 2: (1, "running", "s1")}, servers=[("s1", 2), ("s2", 2)]),
     ["servers"]),
    ("orphan server", [], final(servers=[("s9", 9)]), ["servers"]),
    ("missing server", [op("fork", 0, 1, val=2, parent=1)],
     final(procs={1: (0, "running", None), 2: (1, "running", "s1")}), ["servers"]),
    ("work left pending", [], final(pending=2), ["servers"]),
    ("errno the docs do not give", [op("ls", 0, 1, FAIL, err=errno.EACCES)], final(), ["errors"]),
    ("connection refused while down", [op("ls", 0, 1, FAIL, err=errno.ECONNREFUSED, message="connect: refused")],
     final(faults=[(0, 5)]), []),
    ("connection refused with no fault", [op("ls", 0, 1, FAIL, err=errno.ECONNREFUSED, message="connect: refused")],
     final(), ["errors"]),
    ("EIO far from any fault", [op("ls", 100, 101, FAIL, err=errno.EIO)], final(faults=[(0, 5)]), ["errors"]),
    ("EAGAIN of a nonblocking read is no fault's", [op("read", 100, 101, FAIL, err=errno.EAGAIN, key="k")],
     final(), []),
    ("no answer with no fault near", [op("ls", 100, 115, UNKNOWN, message="deadline")], final(faults=[(0, 5)]),
     ["errors"]),
    ("a process that ended by itself", [op("fork", 0, 1, val=2, parent=1),
                                        op("wait", 3, 4, val="2 p2 exited server vanished", parent=1)],
     final(), ["processes"]),
    ("a record waiting of a process never killed", [op("fork", 0, 1, val=2, parent=1)],
     final(waits={1: [2]}, ended={2: ("exited", "server vanished")}), ["processes"]),
    ("a wait read with no answer may have taken the record",
     [op("fork", 0, 1, val=2, parent=1), op("kill", 2, 3, pid=2), op("wait", 3, 40, UNKNOWN, message="deadline",
                                                                      parent=1)],
     final(faults=[(0, 50)]), []),
    ("stale on another daemon within ZooKeeper's lag", [op("write", 0, 1, key="k", value="a"),
                                                         op("write", 2, 3, key="k", value="b", daemon=2),
                                                         op("read", 4, 5, val="a", key="k")],
     final(env={1: {"k": "b"}}), []),
    ("stale on another daemon beyond ZooKeeper's lag", [op("write", 0, 1, key="k", value="a"),
                                                         op("write", 2, 3, key="k", value="b", daemon=2),
                                                         op("read", 9, 10, val="a", key="k")],
     final(env={1: {"k": "b"}}), ["env"]),
    ("a restarted daemon is a new client", [op("write", 0, 1, key="k", value="a"),
                                            op("write", 2, 3, key="k", value="b"),
                                            op("read", 4, 5, val="a", key="k")],
     final(env={1: {"k": "b"}}, kills={1: [3.5]}, faults=[(3.5, 4)]), []),
    ("stale after an unknown write was seen", [op("write", 0, 1, key="k", value="a"),
                                               op("write", 2, 30, UNKNOWN, key="k", value="b", message="deadline"),
                                               op("read", 4, 5, val="b", key="k"), op("read", 6, 7, val="a", key="k")],
     final(env={1: {"k": "b"}}, faults=[(0, 40)]), ["env"]),
    ("phantom in a listing", [op("ls", 0, 1, val=[1, 42])], final(), ["listings"]),
    ("ended process listed after its record was taken",
     [op("fork", 0, 1, val=2, parent=1), op("kill", 2, 3, pid=2),
      op("wait", 3, 4, val="2 p2 killed", parent=1), op("ls", 5, 6, val=[1, 2])], final(), ["listings"]),
]


@pytest.mark.parametrize("name,ops,fin,want", CASES, ids=[c[0] for c in CASES])
def test_checker(name, ops, fin, want):
    got = sorted({a["check"] for a in check(ops, fin)})
    assert got == sorted(want), check(ops, fin)
