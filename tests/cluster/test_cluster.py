"""The short cluster run CI does: 3 ZooKeeper hosts and 3 daemon hosts in
network namespaces, the workload on every daemon, each nemesis once (20 s
phases), and the checker over the history and the healed state.  The goal
and the assertion: no anomaly.  The longer run is ``bash scripts/cluster run``
(bench/results/cluster.json)."""

import os
import shutil

import pytest

from tests.cluster.nemesis import NEMESES
from tests.cluster.run import run, table

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("java") is None,
                                reason="needs root (network namespaces) and Debian's zookeeper")


async def test_every_nemesis_once_and_nothing_lost(tmp_path):
    results = await run(tmp_path / "cluster", nemeses=NEMESES, duration=20.0, clients=2,
                        history_file=tmp_path / "history.jsonl")
    print(table(results))
    assert [p["nemesis"] for p in results["phases"]] == list(NEMESES)
    for p in results["phases"]:
        assert len(p["faults"]) == 1, p
        for kind in ("fork", "exec", "kill", "wait", "write", "read", "block", "release", "ls"):
            assert p["ops"].get(kind, {}).get("ok", 0) > 0, (p["nemesis"], kind, p["ops"])
        assert p["anomalies"] == [], (p["nemesis"], p["anomalies"])
    assert results["anomalies"] == 0
