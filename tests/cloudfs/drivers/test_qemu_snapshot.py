"""cloudfs.drivers.qemu's boot templates and ``fork live`` copies, against
real QEMU (TCG) guests that mount a :class:`ninep.memfs.MemFS` on their
channels (as in test_qemu.py): a VM restored from its image's template runs
its user-data as its own process; a template whose key changed or whose
files went is not used; a copy of a running VM goes on from the parent's
memory and disk, finds its own identity in fw_cfg and mounts its own
channel, while the parent runs on.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import trio

from cloudfs import imagestore
from cloudfs.drivers import qemusnap
from cloudfs.drivers.base import DriverError, NotFound, ServerSpec
from cloudfs.drivers.qemu import QemuDriver
from ninep.memfs import MemFS
from ninep.server import Server

pytestmark = pytest.mark.guest

DEPLOYMENT = "e" * 32


def spec(pid: int, userdata: bytes = b"", **kw) -> ServerSpec:
    return ServerSpec(**{"pid": pid, "ppid": 1, "name": f"p{pid}", "image": "tiny", "flavor": "m1.tiny",
                         "networks": ("user",), "userdata": userdata, **kw})


@pytest.fixture
def state(tiny_image, tmp_path):
    s = tmp_path / "state"
    imagestore.install_image(s, tiny_image)
    try:
        yield s
    finally:
        QemuDriver(s, accel="tcg").kill_all()


@pytest.fixture
async def served(state):
    """A MemFS served on every VM's channel by a running driver."""
    fs = MemFS()
    pids: list[int] = []

    async def serve(pid, listener):
        pids.append(pid)
        await Server(fs).serve_listeners([listener])

    d = QemuDriver(state, accel="tcg", channel_handler=serve)
    d.bind(DEPLOYMENT, "/test/snap")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(d.run)
        try:
            yield d, fs, pids
        finally:
            nursery.cancel_scope.cancel()


async def until(check, timeout: float = 90.0, what: str = "condition"):
    with trio.move_on_after(timeout):
        while True:
            v = await check()
            if v:
                return v
            await trio.sleep(0.05)
    raise AssertionError(f"{what} not met within {timeout}s")


def data(fs: MemFS, name: str) -> bytes | None:
    n = fs.root.children.get(name)
    return bytes(n.data) if n is not None else None


def pss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise AssertionError("no Pss")


async def test_snapshot_boot_from_template(served, state):
    d, fs, pids = served
    tdir = await d.prepare_template("tiny")
    doc = json.loads((tdir / "template.json").read_text())
    assert (tdir / "state").stat().st_size < 8 << 20  # the RAM is in the shared file, not in the state
    assert os.stat(doc["memory"]).st_size == 256 << 20 and str(d.shm_dir) in doc["memory"]
    assert await d.prepare_template("tiny") == tdir  # made once

    t0 = time.monotonic()
    servers = [await d.create(spec(pid, f"echo $CLOUDFS_PID > /cloud/up-$CLOUDFS_PID\nsleep 600\n".encode()))
               for pid in (11, 12)]
    for pid in (11, 12):
        await until(lambda: trio.to_thread.run_sync(data, fs, f"up-{pid}"), what=f"restored VM {pid} ran")
        assert data(fs, f"up-{pid}") == f"{pid}\n".encode()
    took = time.monotonic() - t0
    for s in servers:
        console = (state / "vms" / s.id / "console.log").read_text(errors="replace")
        assert f"restoring {s.id}" in console and "cloudfs-template: ready" not in console
        assert (await d.status(s.id)).status == "running"
    assert sorted(set(pids)) == [11, 12]
    assert took < 20, took  # cold boots of two under TCG take longer; the bench measures
    # the copies share the template's pages: each accounts for part of them
    for s in servers:
        assert pss_kib(d.qemu_pid(s.id)) < 120 * 1024


async def test_stale_or_broken_template_is_not_used(served, state):
    d, fs, pids = served
    tdir = await d.prepare_template("tiny")
    doc = json.loads((tdir / "template.json").read_text())
    os.unlink(doc["memory"])  # e.g. /dev/shm emptied by a reboot
    s = await d.create(spec(21, b"echo cold > /cloud/c21\nsleep 600\n"))
    await until(lambda: trio.to_thread.run_sync(data, fs, "c21"), what="cold-booted VM ran")
    assert "restoring" not in (state / "vms" / s.id / "console.log").read_text(errors="replace")
    # the create asked for a new template, which the driver makes in the background
    await until(lambda: trio.to_thread.run_sync(lambda: qemusnap.load_template(
        tdir, doc["key"]) is not None), timeout=120, what="template made again")
    # a different key (another QEMU, kernel, image, flavor …) names another template
    d.kernel_args = "loglevel=3"
    assert d._ready_template(imagestore.get_image(state, "tiny"), "m1.tiny", "tcg") is None
    d.kernel_args = ""
    assert d._ready_template(imagestore.get_image(state, "tiny"), "m1.tiny", "tcg") is not None
    # a template whose restore fails is dropped and the VM boots cold
    (tdir / "state").write_bytes(b"not a migration stream")
    s2 = await d.create(spec(22, b"echo cold > /cloud/c22\nsleep 600\n"))
    await until(lambda: trio.to_thread.run_sync(data, fs, "c22"), what="VM after a failed restore ran")
    assert "restoring" in (state / "vms" / s2.id / "console.log").read_text(errors="replace")
    assert (await d.status(s2.id)).status == "running"
    # the broken template went (and the create asked for a new one)
    assert not (tdir / "state").exists() or (tdir / "state").read_bytes() != b"not a migration stream"


#: A user-data that counts in memory; in a copy, once the guest's
#: cloudfs-watch took the copy's identity and mounted /cloud again, it says
#: so with what it had in memory.
COUNTER = rb"""
. /etc/cloudfs/identity
me=$CLOUDFS_PID
n=0
table=""
i=0; while [ $i -lt 50 ]; do table="$table $((i * i))"; i=$((i + 1)); done
echo "$table" > /tmp/table
while :; do
  . /etc/cloudfs/identity
  if [ "$CLOUDFS_PID" != "$me" ]; then
    me=$CLOUDFS_PID
    until echo "$n $(wc -w < /tmp/table)" > /cloud/copy-$me; do sleep 0.1; done
  fi
  n=$((n + 1))
  echo $n > /cloud/count-$me 2>/dev/null
  sleep 0.1
done
"""


async def test_live_copy_goes_on_from_parents_memory(served, state):
    d, fs, pids = served
    parent = await d.create(spec(31, COUNTER))
    await until(lambda: trio.to_thread.run_sync(lambda: int(data(fs, "count-31") or 0) > 5), what="parent counts")
    qpid = d.qemu_pid(parent.id)
    snap = await d.snapshot(parent.id)
    before = int(data(fs, "count-31"))
    meta = qemusnap.load_snapshot(state / "snapshots" / snap)
    assert meta is not None and meta.parent == parent.id and meta.deployment == DEPLOYMENT
    child = await d.create(spec(32, COUNTER, snapshot=snap))
    assert not (state / "snapshots" / snap).exists()  # consumed
    got = await until(lambda: trio.to_thread.run_sync(data, fs, "copy-32"), what="the copy took its identity")
    n, words = got.split()
    assert int(n) >= before - 1 and int(words) == 50  # it went on from the parent's memory
    await until(lambda: trio.to_thread.run_sync(lambda: int(data(fs, "count-32") or 0) > int(n) + 3),
                what="the copy counts on")
    # the parent ran on, in the same QEMU
    await until(lambda: trio.to_thread.run_sync(lambda: int(data(fs, "count-31")) > before + 5),
                what="the parent counts on")
    assert d.qemu_pid(parent.id) == qpid and (await d.status(parent.id)).status == "running"
    assert (await d.status(child.id)).status == "running" and d.qemu_pid(child.id) != qpid
    assert data(fs, "copy-31") is None
    # a snapshot is used once
    with pytest.raises(DriverError):
        await d.create(spec(33, snapshot=snap))
    with pytest.raises(DriverError):
        await d.create(spec(33, snapshot="../../etc"))
    snap2 = await d.snapshot(parent.id)
    await d.discard_snapshot(snap2)
    await d.discard_snapshot("snap-../x")
    assert not (state / "snapshots" / snap2).exists()


async def test_live_copy_refusals(served, state):
    d, fs, pids = served
    import errno
    with pytest.raises(DriverError) as e:
        await d.snapshot("vm-nope")
    assert e.value.errno == errno.ENOENT
    await d.create_network("lab")
    s = await d.create(spec(41, b"sleep 600\n", networks=("user", "lab")))
    with pytest.raises(DriverError) as e:
        await d.snapshot(s.id)
    assert e.value.errno == errno.EOPNOTSUPP


async def test_the_scratch_disk_a_move_carries(served, state):
    """A move carries the scratch disk: :meth:`scratch_out` gives what the
    guest wrote (its data extents) and nothing for a guest that wrote
    nothing; :meth:`scratch_in` opens only an incoming copy's disk."""
    d, fs, pids = served
    quiet = await d.create(spec(51, b"echo up > /cloud/up-51\nsleep 600\n"))
    wrote = await d.create(spec(52, b"echo data-52 | dd of=/dev/vda bs=512 seek=2048 conv=fsync; "
                                    b"echo up > /cloud/up-52\nsleep 600\n"))
    for pid in (51, 52):
        await until(lambda: trio.to_thread.run_sync(data, fs, f"up-{pid}"), what=f"VM {pid} ran")
    assert (await d.move_spec(quiet.id))["running"] is True
    assert (await d.move_spec(wrote.id))["running"] is True
    fd, extents = await trio.to_thread.run_sync(d.scratch_out, quiet.id)
    os.close(fd)
    assert extents == []
    fd, extents = await trio.to_thread.run_sync(d.scratch_out, wrote.id)
    try:
        assert extents and sum(n for _, n in extents) < 1 << 20
        assert any(off <= 1 << 20 < off + n for off, n in extents)
        assert os.pread(fd, 8, 1 << 20) == b"data-52\n"
    finally:
        os.close(fd)
    with pytest.raises(NotFound):
        await trio.to_thread.run_sync(d.scratch_in, wrote.id)  # not an incoming copy
