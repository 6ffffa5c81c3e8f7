"""cloudfs.drivers.scratchroom: scratch disks are admitted only while all
of them, filled, leave the reserve free.  Real sparse files on a real
tmpfs of a known size (mounted by the test, so root only); then the QEMU
driver refusing a create that would overcommit its state dir's disk."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import threading
from pathlib import Path

import pytest
import trio

from cloudfs import imagestore
from cloudfs.drivers import qemu, qmp
from cloudfs.drivers.base import DriverError, ServerSpec
from cloudfs.drivers.scratchroom import ScratchRoom, shortfall, unwritten

MiB = 1 << 20

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")


@pytest.mark.parametrize("free, promised, need, reserve, missing", [
    (100, 0, 50, 10, -40),
    (100, 40, 50, 10, 0),     # exactly fits
    (100, 41, 50, 10, 1),
    (100, 0, 0, 100, 0),      # a disk that can grow no more needs only the reserve
    (0, 0, 1, 0, 1),
    (10, 200, 0, 0, 190),     # already overcommitted (by what was there before): nothing more
])
def test_shortfall(free, promised, need, reserve, missing):
    assert shortfall(free, promised, need, reserve) == missing


def test_unwritten_counts_what_a_sparse_file_may_still_take(tmp_path):
    p = tmp_path / "disk"
    assert unwritten(p) == 0
    with open(p, "wb") as f:
        f.truncate(8 * MiB)
    assert unwritten(p) == 8 * MiB
    with open(p, "r+b") as f:
        f.seek(2 * MiB)
        f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())
    assert 7 * MiB - 64 * 1024 <= unwritten(p) <= 7 * MiB
    with open(p, "r+b") as f:
        f.write(os.urandom(8 * MiB))
    assert unwritten(p) == 0
    with open(p, "r+b") as f:
        f.truncate(MiB)  # shrunk below what it held: nothing more, never negative
    assert unwritten(p) == 0


@contextlib.contextmanager
def tmpfs(where: Path, size: int):
    where.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {p.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _disk(vms: Path, name: str, size: int) -> Path:
    d = vms / name
    d.mkdir(parents=True)
    with open(d / "scratch.img", "wb") as f:
        f.truncate(size)
    return d / "scratch.img"


@root_only
def test_claims_keep_the_reserve_with_every_disk_full(tmp_path):
    with tmpfs(tmp_path / "fs", 64 * MiB) as fs:
        vms, copies = fs / "vms", fs / "snapshots"
        room = ScratchRoom(fs, (copies, vms), 8 * MiB)
        for name in ("a", "b"):
            with room.claim(20 * MiB, "a test disk", vms / name / "scratch.img"):
                disk = _disk(vms, name, 20 * MiB)
                before = 0 if name == "a" else 16 * MiB  # disk a, written below
                assert room.promised() == before + 20 * MiB  # the claim stands for the disk made
                with open(disk, "r+b") as f:  # written while claimed: owed the rest only
                    f.write(os.urandom(4 * MiB))
                assert room.promised() == before + 16 * MiB
        assert room.promised() == 32 * MiB
        with pytest.raises(DriverError) as e:  # 64 − 8 used − 32 owed < 20 + 8
            with room.claim(20 * MiB, "a third disk"):
                pytest.fail("admitted")
        assert e.value.errno == errno.ENOSPC
        assert "not enough disk for a third disk" in e.value.message and "32 MiB of it owed" in e.value.message
        # a guest filling its disk changes nothing: what it writes was owed
        with open(vms / "a" / "scratch.img", "r+b") as f:
            f.write(os.urandom(20 * MiB))
        assert room.promised() == 16 * MiB
        with pytest.raises(DriverError):
            with room.claim(20 * MiB, "a third disk"):
                pass
        # a disk that can grow by 8 MiB fits (64 − 24 used − 16 owed ≥ 8 + 8)
        with room.claim(8 * MiB, "a small disk"):
            pass
        # a fork live copy waiting to start is owed its disk too, and a rename
        # of it into vms/ (its child) keeps it counted
        _disk(copies, "c", 8 * MiB)
        assert room.promised() == 24 * MiB
        with pytest.raises(DriverError):  # 64 − 24 used − 24 owed < 10 + 8
            with room.claim(10 * MiB, "a small disk"):
                pass
        room.rename(copies / "c", vms / "c")
        assert room.promised() == 24 * MiB
        # what is not a VM's directory is not looked into
        (vms / "loop").symlink_to(vms / "loop")
        (vms / "file").write_bytes(b"x")
        (vms / "empty").mkdir()
        assert room.promised() == 24 * MiB
        # a VM ending gives its room back
        (vms / "b" / "scratch.img").unlink()
        (vms / "c" / "scratch.img").unlink()
        with room.claim(20 * MiB, "a third disk"):
            pass


@root_only
def test_what_cannot_be_read_is_eio(tmp_path):
    with tmpfs(tmp_path / "fs", 64 * MiB) as fs:
        vms = fs / "vms"
        vms.mkdir()
        (vms / "a").mkdir()
        (vms / "a" / "scratch.img").symlink_to("scratch.img")  # ELOOP
        room = ScratchRoom(fs, (vms,), 0)
        with pytest.raises(DriverError) as e:
            with room.claim(MiB, "a disk"):
                pass
        assert e.value.errno == errno.EIO and "cannot tell the room left" in e.value.message
        gone = ScratchRoom(fs / "nowhere", (vms,), 0)
        with pytest.raises(DriverError) as e:
            with gone.claim(MiB, "a disk"):
                pass
        assert e.value.errno == errno.EIO and "cannot tell the free space" in e.value.message


@root_only
def test_a_claim_under_way_counts_for_the_others(tmp_path):
    with tmpfs(tmp_path / "fs", 64 * MiB) as fs:
        room = ScratchRoom(fs, (fs / "vms",), 8 * MiB)
        inside, release = threading.Event(), threading.Event()
        outcome: list[object] = []

        def first():
            with room.claim(30 * MiB, "the first"):
                inside.set()
                release.wait(10)

        t = threading.Thread(target=first)
        t.start()
        try:
            assert inside.wait(10)
            assert room.promised() == 30 * MiB
            try:
                with room.claim(30 * MiB, "the second"):  # 64 − 30 < 30 + 8
                    outcome.append("admitted")
            except DriverError as e:
                outcome.append(e.errno)
        finally:
            release.set()
            t.join()
        assert outcome == [errno.ENOSPC]
        assert room.promised() == 0
        with room.claim(30 * MiB, "the second"):
            pass


@root_only
@pytest.mark.guest
async def test_qemu_create_refuses_to_overcommit_the_state_dir(tiny_image, tmp_path, monkeypatch):
    monkeypatch.setattr(qemu, "DISK_RESERVE", 256 * MiB)
    with tmpfs(tmp_path / "fs", 3000 * MiB) as fs:
        state = fs / "state"
        imagestore.install_image(state, tiny_image)  # about 75 MiB
        d = qemu.QemuDriver(state, accel="tcg", snapshot_boot=False)
        d.bind("d" * 32, "/test/qemu")
        try:
            def spec(pid: int, **kw) -> ServerSpec:
                return ServerSpec(**{"pid": pid, "ppid": 1, "name": f"p{pid}", "image": "tiny",
                                     "flavor": "m1.tiny", "networks": ("user",), "userdata": b"", **kw})

            # 1 GiB scratch disks: two fit in ~2.9 GiB with 256 MiB kept free, a third
            # does not, however little the first two hold now
            first = await d.create(spec(2))
            second = await d.create(spec(3))
            with pytest.raises(DriverError) as e:
                await d.create(spec(4))
            assert e.value.errno == errno.ENOSPC and "not enough disk for a m1.tiny VM's scratch disk" \
                in e.value.message, e.value.message
            assert len(list((state / "vms").iterdir())) == 2  # nothing left of the refused one
            # nor is there room for a fork live copy (its disk, RAM and device state: 1344 MiB)
            with pytest.raises(DriverError) as e:
                await d.snapshot(first.id)
            assert e.value.errno == errno.ENOSPC and "a fork live copy of" in e.value.message, e.value.message
            assert list((state / "snapshots").iterdir()) == []
            await d.delete(first.id)
            # room again, for a copy (owed its whole disk) or a VM, not both
            copy = await d.snapshot(second.id)
            with pytest.raises(DriverError) as e:
                await d.create(spec(4))
            assert e.value.errno == errno.ENOSPC, e.value.message
            await d.discard_snapshot(copy)
            assert (await d.status(second.id)).status == "running"
            # a guest rewriting its memory faster than it is saved: its copy is
            # cancelled past the limit (here set to 1 MiB), the VM runs on
            ram = qemu.FLAVORS["m1.tiny"][0] << 20
            with monkeypatch.context() as m:
                m.setattr(qemu, "STATE_SLACK", -2 * (ram - MiB))
                with pytest.raises(DriverError) as e:
                    await d.snapshot(second.id)
            assert e.value.errno == errno.EAGAIN and "more than the 1 MiB it may" in e.value.message, e.value.message
            assert list((state / "snapshots").iterdir()) == []
            assert (await d.status(second.id)).status == "running"
            # a save that nears its limit is finished by QEMU at once (here at its first look,
            # and saving at 16 MiB/s, so that it cannot be over before): QEMU pauses the guest for
            # the last pass itself and it runs on after
            with monkeypatch.context() as m:
                m.setattr(qmp, "CONVERGE_HEADROOM", 1 << 40)
                m.setattr(qmp, "MIGRATE_BANDWIDTH", 16 << 20)
                copy = await d.snapshot(second.id)
            got = await trio.to_thread.run_sync(qmp.qmp_command, state / "vms" / second.id / "qmp.sock",
                                                "query-migrate-parameters")
            assert got["downtime-limit"] == qmp.FINISH_DOWNTIME_MS
            assert (await d.status(second.id)).status == "running"
            child = await d.create(spec(5, snapshot=copy))
            assert (await d.status(child.id)).status == "running"
            await d.delete(child.id)
            await d.create(spec(4))
        finally:
            await trio.to_thread.run_sync(d.kill_all)
