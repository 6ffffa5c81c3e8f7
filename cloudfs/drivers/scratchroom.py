"""Room on the host's disk for the VMs' scratch disks.

A QEMU VM's scratch disk is a sparse raw file (cloudfs.drivers.qemu): it
takes no space until the guest writes, and then up to its size.  A guest
is untrusted code, so the daemon admits a scratch disk only if *every*
scratch disk of the state dir, each filled to its size, would still leave
``reserve`` bytes free on its filesystem::

    free − Σ (size − allocated) over the disks there − claims under way ≥ need + reserve

``allocated`` is st_blocks × 512, what the file holds now: a guest's
writes move bytes from the sum to what is used, so the inequality stays
true as guests fill their disks.  The disks are the ``scratch.img`` of
each directory under the given directories: the VMs' and the ``fork
live`` copies' (a copy waiting to start is owed its whole disk, so its
child never finds the room gone).  A claim (:meth:`ScratchRoom.claim`)
is held from the check until the thing it admits exists; the file it
names is counted as the claim less what the file holds meanwhile, so
concurrent admissions cannot both take the last room.  Disks move between
the directories only by :meth:`ScratchRoom.rename`, under the same lock as
the count.

Not counted beyond the space they use now: images, boot templates, the
state files of ``fork live`` copies once made (while one is made it
claims the VM's RAM and device state), each VM's initramfs and fw_cfg
files (written once, about 1.5 MiB for the tiny image) and console (at
most 1.5 MiB), all out of the reserve, an image disk's temporary overlay (QEMU
``snapshot=on``, in ``$TMPDIR``), other programs, and a second state dir
on the same filesystem.  On a copy-on-write filesystem (btrfs, XFS with
reflink) a ``fork live`` copy shares its parent's blocks, which both
report as allocated: what either guest then rewrites takes space that
was not counted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from .base import DriverError

__all__ = ["ScratchRoom", "DISK_NAME", "shortfall", "unwritten"]

#: The file name of a scratch disk in its VM's (or copy's) directory.
DISK_NAME = "scratch.img"


def shortfall(free: int, promised: int, need: int, reserve: int) -> int:
    """Bytes missing for a new disk that may take ``need`` more bytes when
    ``free`` bytes are free and ``promised`` are owed to the disks already
    admitted, keeping ``reserve`` free at the end (all in bytes; ≤ 0: it fits)."""
    return need + reserve + promised - free


def unwritten(path: Path) -> int:
    """Blocking: the bytes the sparse file ``path`` may still take, its size
    less what it holds now (never below 0); 0 if it does not exist.
    OSError as stat(2) raises it otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0
    return max(0, st.st_size - st.st_blocks * 512)


def _allocated(path: Path) -> int:
    """Blocking: the bytes ``path`` holds (st_blocks × 512); 0 if it does not exist."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


class ScratchRoom:
    """The admission of scratch disks to ``state_dir``'s filesystem: the
    disks are ``*/scratch.img`` under each of ``disk_dirs``; ``reserve``
    (bytes) stays free when they are all full (module docstring).
    Thread-safe; its methods block (stat and statvfs), so call them from a
    worker thread."""

    def __init__(self, state_dir: Path, disk_dirs: tuple[Path, ...], reserve: int):
        self.state_dir, self.disk_dirs, self.reserve = Path(state_dir), tuple(map(Path, disk_dirs)), reserve
        self._lock = threading.Lock()
        self._claims: dict[int, tuple[Path | None, int]] = {}
        self._next = 0

    def promised(self) -> int:
        """Bytes the disks may still take plus the claims under way.
        DriverError (EIO) if they cannot be listed."""
        with self._lock:
            return self._owed()

    def _owed(self) -> int:
        # (lock held) A claim's file is owed the claim less what it holds.
        claimed = {p for p, _ in self._claims.values() if p is not None}
        try:
            owed = sum(n if p is None else max(0, n - _allocated(p)) for p, n in self._claims.values())
            for top in self.disk_dirs:
                try:
                    entries = list(os.scandir(top))
                except FileNotFoundError:
                    continue
                for d in entries:
                    disk = Path(d.path) / DISK_NAME
                    if d.is_dir(follow_symlinks=False) and disk not in claimed:
                        owed += unwritten(disk)
        except OSError as e:
            raise DriverError(f"cannot tell the room left for scratch disks: {e}") from None
        return owed

    def rename(self, src: Path, dst: Path) -> None:
        """os.replace(``src``, ``dst``) with no count under way: a disk
        moving between the directories is never missed nor counted twice.
        OSError as rename(2) raises it."""
        with self._lock:
            os.replace(src, dst)

    @contextlib.contextmanager
    def claim(self, need: int, what: str, path: Path | None = None) -> Iterator[None]:
        """Hold room for ``need`` bytes while the body makes ``what`` (its
        name in the error); ``path``: the disk it makes, counted as the
        claim less what it holds until the claim ends.  DriverError: ENOSPC when
        the room is not there, EIO when the disks or the free space cannot
        be read."""
        with self._lock:
            try:
                st = os.statvfs(self.state_dir)
            except OSError as e:
                raise DriverError(f"cannot tell the free space in {self.state_dir}: {e}") from None
            free = st.f_bavail * st.f_frsize
            promised = self._owed()
            if shortfall(free, promised, need, self.reserve) > 0:
                raise DriverError(
                    f"not enough disk for {what}: {free >> 20} MiB free in {self.state_dir}, "
                    f"{promised >> 20} MiB of it owed to the scratch disks there, {need >> 20} MiB for this "
                    f"one and {self.reserve >> 20} MiB to keep free", errno=errno.ENOSPC)
            key = self._next
            self._next += 1
            self._claims[key] = (Path(path) if path is not None else None, need)
        try:
            yield
        finally:
            with self._lock:
                del self._claims[key]
