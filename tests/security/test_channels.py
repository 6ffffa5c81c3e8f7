"""A guest attacks through its channel (issue "Guest channels and secrets"):
900 connections from one real QEMU guest to the daemon.  No host process is
started per connection, the daemon holds at most CHANNEL_LIMITS.max_connections
of them (descriptors stay bounded), and both the attacker's own ``/cloud`` and
another VM's keep answering throughout.  ``cloudfs up --driver qemu`` runs as
a child process, as a user runs it."""

from __future__ import annotations

import os

import pytest
import trio

from cloudfs.channel import CHANNEL_LIMITS
from cloudfs.imagestore import install_image
from cloudfs.drivers.qemu import QemuDriver
from ninep.client import Client, open_client
from tests.security.conftest import Daemon

pytestmark = pytest.mark.guest

#: The attacker: 900 connections held open (each nc reads a FIFO that never
#: gets data), then, on its old mount, says it is still served.
ATTACKER = r"""
mkfifo /tmp/f
exec 9<>/tmp/f
echo ready > /cloud/proc/self/env/ready
i=0
while [ $i -lt 900 ]; do nc 10.0.2.2 564 <&9 >/dev/null 2>&1 & i=$((i+1)); done
echo $i > /cloud/proc/self/env/started
sleep 5
echo flooded > /cloud/proc/self/env/flooded
cat /cloud/proc/self/env/quit
"""

#: The bystander: a counter in its env every 0.3 s.
BYSTANDER = r"""
i=0
while :; do i=$((i+1)); echo $i > /cloud/proc/self/env/n; sleep 0.3; done
"""


@pytest.fixture
def qemu_daemon(tmp_path, private_zookeeper, tiny_image):
    install_image(tmp_path / "state", tiny_image)
    d = Daemon(tmp_path, private_zookeeper, "--driver", "qemu").start()
    try:
        yield d
    finally:
        d.stop()
        QemuDriver(d.state, accel="tcg").kill_all()


async def _ctl(c: Client, pid: int, command: str) -> str:
    async with await c.walk(f"proc/{pid}/ctl") as f:
        await f.open(os.O_RDWR)
        await f.write(0, command.encode() + b"\n")
        return (await f.read_all()).decode().strip()


async def _env(c: Client, pid: int, key: str, timeout: float = 120) -> str:
    with trio.fail_after(timeout):
        return (await c.read_file(f"proc/{pid}/env/{key}")).decode().strip()


def _processes() -> int:
    return sum(1 for p in os.listdir("/proc") if p.isdigit())


async def test_900_connections_from_one_guest(qemu_daemon):
    d = qemu_daemon
    async with open_client(d.operator) as c:
        vms = {}
        for name, script, flavor in (("attacker", ATTACKER, "m1.small"), ("bystander", BYSTANDER, "m1.tiny")):
            pid = int(await _ctl(c, 1, "fork"))
            await c.write_file(f"proc/{pid}/userdata", script.encode())
            await _ctl(c, pid, f"exec tiny flavor={flavor}")
            vms[name] = pid
        a, b = vms["attacker"], vms["bystander"]
        await _env(c, b, "n")
        assert await _env(c, a, "ready") == "ready"
        procs, fds = _processes(), d.fds()
        before = int(await _env(c, b, "n"))
        assert await _env(c, a, "started", timeout=300) == "900"
        most_fds, most_procs = fds, procs
        with trio.fail_after(120):
            while True:
                most_fds, most_procs = max(most_fds, d.fds()), max(most_procs, _processes())
                try:
                    with trio.move_on_after(0.2):
                        if await c.read_file(f"proc/{a}/env/flooded") == b"flooded\n":
                            break
                except OSError:
                    pass
        # the attacker's own mount was served throughout, the bystander's counter kept rising
        after = int(await _env(c, b, "n"))
        assert after > before + 5, (before, after)
        # a channel holds at most max_connections (4) plus its listener: nothing grew per connection
        assert most_fds <= fds + CHANNEL_LIMITS.max_connections + 1, (fds, most_fds)
        assert most_procs < procs + 20, (procs, most_procs)  # not one host process per connection
        assert "max_connections (4) reached" in d.log.read_text()
        assert d.alive() and not d.tracebacks()
        await c.write_file(f"proc/{a}/env/quit", b"0\n")
        for p in (a, b):
            await _ctl(c, p, "kill")
