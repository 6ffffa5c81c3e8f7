"""cloudfs.drivers.extents: the data ranges of a sparse file (SEEK_DATA/SEEK_HOLE)."""

import os

import pytest

from cloudfs.drivers.extents import copy_ranges, data_extents

MiB = 1 << 20


def _file(path, size, writes):
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            f.seek(off)
            f.write(data)
    return os.open(path, os.O_RDONLY)


def _read(fd, extents):
    return {off: os.pread(fd, n, off) for off, n in extents}


def test_a_fresh_sparse_file_has_no_data(tmp_path):
    fd = _file(tmp_path / "d", 64 * MiB, [])
    try:
        assert data_extents(fd) == []
    finally:
        os.close(fd)


def test_extents_cover_every_byte_written_and_little_else(tmp_path):
    writes = [(0, b"boot"), (8 * MiB, b"x" * 5000), (64 * MiB - 3, b"end")]
    fd = _file(tmp_path / "d", 64 * MiB, writes)
    try:
        ext = data_extents(fd)
        assert ext == sorted(ext) and all(n > 0 for _, n in ext)
        assert all(a + n <= b for (a, n), (b, _) in zip(ext, ext[1:]))  # no overlap
        assert sum(n for _, n in ext) < 4 * MiB  # the holes are left out
        for off, data in writes:  # every byte written lies in an extent and reads back
            assert any(a <= off and off + len(data) <= a + n for a, n in ext), off
        got = bytearray(64 * MiB)
        for off, chunk in _read(fd, ext).items():
            got[off:off + len(chunk)] = chunk
        want = bytearray(64 * MiB)
        for off, data in writes:
            want[off:off + len(data)] = data
        assert got == want
    finally:
        os.close(fd)


def test_size_bounds_the_extents(tmp_path):
    fd = _file(tmp_path / "d", 16 * MiB, [(0, b"a"), (12 * MiB, b"b")])
    try:
        ext = data_extents(fd, 4 * MiB)
        assert ext and all(a + n <= 4 * MiB for a, n in ext)
        assert data_extents(fd, 0) == []
    finally:
        os.close(fd)


@pytest.mark.parametrize("extents, chunk, gap, want", [
    ([], 10, 4, []),
    ([(0, 5)], 10, 4, [(0, 5)]),
    ([(0, 25)], 10, 0, [(0, 10), (10, 10), (20, 5)]),
    ([(0, 2), (5, 2)], 10, 4, [(0, 7)]),              # 3 bytes apart: one read
    ([(0, 2), (6, 2)], 10, 4, [(0, 2), (6, 2)]),      # 4 apart: two
    ([(0, 2), (5, 2), (9, 8)], 10, 4, [(0, 10), (10, 7)]),
    ([(0, 3), (3, 3)], 10, 0, [(0, 3), (3, 3)]),      # adjacent, no merging asked for
    ([(100, 0), (200, 1)], 10, 4, [(200, 1)]),        # empty extents are no reads
])
def test_copy_ranges_merge_near_extents_and_cut_chunks(extents, chunk, gap, want):
    got = copy_ranges(extents, chunk, gap)
    assert got == want
    covered = {b for off, n in got for b in range(off, off + n)}
    assert all(b in covered for off, n in extents for b in range(off, off + n))
    assert all(0 < n <= chunk for _, n in got)


@pytest.mark.parametrize("chunk, gap", [(0, 1), (1, -1)])
def test_copy_ranges_refuses_nonsense(chunk, gap):
    with pytest.raises(ValueError):
        copy_ranges([(0, 1)], chunk, gap)
