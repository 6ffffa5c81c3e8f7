"""Room on the host's disk for the VMs' scratch disks.

A QEMU VM's scratch disk is a sparse raw file (cloudfs.drivers.qemu): it
takes no space until the guest writes, and then up to its size.  A guest
is untrusted code, so the daemon admits a scratch disk only if *every*
scratch disk of the state dir, each filled to its size, would still leave
``reserve`` bytes free on its filesystem::

    free − Σ (size − allocated) over the disks there − claims under way ≥ need + reserve

(``allocated``: st_blocks × 512, what the file holds now; a guest's writes
move bytes from the sum to what is used, so the inequality stays true as
guests fill their disks).  A claim is held from the check until the new
disk exists (:meth:`ScratchRoom.claim`), so concurrent creates cannot both
take the last room; while both the claim and the file exist the disk is
counted twice, which errs on the side of refusing.

A ``fork live`` copy claims its size the same way while it is made (the
disk's data and the VM's RAM); once made it, like everything else outside
the ``vms`` directory (images, boot templates, other programs), counts only
as the space it uses.  A second state dir on the same filesystem is not
seen.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from .base import DriverError

__all__ = ["ScratchRoom", "shortfall", "unwritten"]


def shortfall(free: int, promised: int, need: int, reserve: int) -> int:
    """Bytes missing for a new disk that may take ``need`` more bytes when
    ``free`` bytes are free and ``promised`` are owed to the disks already
    admitted, keeping ``reserve`` free at the end (all in bytes; ≤ 0: it fits)."""
    return need + reserve + promised - free


def unwritten(path: Path) -> int:
    """Blocking: the bytes the sparse file ``path`` may still take, its size
    less what it holds now (never below 0); 0 if it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0
    return max(0, st.st_size - st.st_blocks * 512)


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class ScratchRoom:
    """The admission of scratch disks to ``state_dir``'s filesystem: the
    disks are ``vms_dir/*/scratch.img``; ``reserve`` (bytes) stays free
    when they are all full (module docstring).  Thread-safe; its methods
    block (stat and statvfs), so call them from a worker thread."""

    def __init__(self, state_dir: Path, vms_dir: Path, reserve: int):
        self.state_dir, self.vms_dir, self.reserve = Path(state_dir), Path(vms_dir), reserve
        self._lock = threading.Lock()
        self._claims: dict[int, int] = {}
        self._next = 0

    def promised(self) -> int:
        """Bytes the disks in ``vms_dir`` may still take, plus the claims under way."""
        owed = sum(self._claims.values())
        try:
            dirs = list(os.scandir(self.vms_dir))
        except FileNotFoundError:
            return owed
        for d in dirs:
            if d.is_dir(follow_symlinks=False):
                owed += unwritten(Path(d.path) / "scratch.img")
        return owed

    @contextlib.contextmanager
    def claim(self, size: int, what: str, have: Path | None = None) -> Iterator[None]:
        """Hold room for a new disk of ``size`` bytes while the body makes
        it (``what`` names it in the error).  ``have``: an existing file
        that becomes the disk (a ``fork live`` copy's), whose data already
        takes its space.  DriverError (ENOSPC) when the room is not there;
        OSError as statvfs raises it."""
        need = unwritten(have) if have is not None else size
        with self._lock:
            free = _free_bytes(self.state_dir)
            promised = self.promised()
            missing = shortfall(free, promised, need, self.reserve)
            if missing > 0:
                raise DriverError(
                    f"not enough disk for {what}: {free >> 20} MiB free in {self.state_dir}, "
                    f"{promised >> 20} MiB of it owed to the scratch disks there, {need >> 20} MiB for this "
                    f"one and {self.reserve >> 20} MiB to keep free", errno=errno.ENOSPC)
            key = self._next
            self._next += 1
            self._claims[key] = need
        try:
            yield
        finally:
            with self._lock:
                del self._claims[key]
