"""The data extents of a sparse file: what a copy of it has to carry.

A VM's scratch disk is a sparse raw file (cloudfs.drivers.qemu): only what
the guest wrote occupies blocks.  :func:`data_extents` lists those ranges
with lseek(2) ``SEEK_DATA``/``SEEK_HOLE`` (Linux ≥ 3.1; a filesystem that
does not track holes reports the whole file as data, which is still right,
only larger), so a move sends what was written and not gigabytes of zeros.
"""

from __future__ import annotations

import errno
import os

__all__ = ["copy_ranges", "data_extents"]


def data_extents(fd: int, size: int | None = None) -> list[tuple[int, int]]:
    """``[(offset, length), …]`` (bytes, ascending, not overlapping) of the
    data in the open file ``fd`` up to ``size`` (default: its size); holes
    read as zeros and are left out.  Blocking; OSError as lseek(2) raises
    it (other than ENXIO, which means no data past an offset)."""
    end = os.fstat(fd).st_size if size is None else size
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole from pos on
                break
            raise
        if start >= end:
            break
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        out.append((start, stop - start))
        pos = stop
    return out


def copy_ranges(extents: list[tuple[int, int]], chunk: int, gap: int) -> list[tuple[int, int]]:
    """The reads that copy ``extents`` (``[(offset, length)]``, bytes,
    ascending, not overlapping, as :func:`data_extents` returns them):
    extents less than ``gap`` bytes apart are read as one (the hole between
    reads as zeros, so copying it is harmless and saves a read and a frame
    per small extent), cut into pieces of at most ``chunk`` bytes.  Pure;
    ValueError for ``chunk`` < 1 or ``gap`` < 0."""
    if chunk < 1 or gap < 0:
        raise ValueError(f"chunk {chunk} and gap {gap}")
    merged: list[list[int]] = []
    for off, n in extents:
        if n <= 0:
            continue
        if merged and off - (merged[-1][0] + merged[-1][1]) < gap:
            merged[-1][1] = off + n - merged[-1][0]
        else:
            merged.append([off, n])
    return [(pos, min(chunk, off + n - pos)) for off, n in merged for pos in range(off, off + n, chunk)]
