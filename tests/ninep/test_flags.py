"""9P2000.L Tlopen/Tlcreate open flags: the P9_DOTL_* wire values and their
translation to and from this host's ``os.O_*`` flags (Linux
include/net/9p/9p.h), also for hosts whose O_* values differ from x86's."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from ninep import messages as m

# (name, value in Linux include/net/9p/9p.h, os counterpart or None).
DOTL_FLAGS = [
    ("P9_DOTL_RDONLY", 0o0, "O_RDONLY"),
    ("P9_DOTL_WRONLY", 0o1, "O_WRONLY"),
    ("P9_DOTL_RDWR", 0o2, "O_RDWR"),
    ("P9_DOTL_NOACCESS", 0o3, None),
    ("P9_DOTL_CREATE", 0o100, "O_CREAT"),
    ("P9_DOTL_EXCL", 0o200, "O_EXCL"),
    ("P9_DOTL_NOCTTY", 0o400, "O_NOCTTY"),
    ("P9_DOTL_TRUNC", 0o1000, "O_TRUNC"),
    ("P9_DOTL_APPEND", 0o2000, "O_APPEND"),
    ("P9_DOTL_NONBLOCK", 0o4000, "O_NONBLOCK"),
    ("P9_DOTL_DSYNC", 0o10000, "O_DSYNC"),
    ("P9_DOTL_FASYNC", 0o20000, "O_ASYNC"),
    ("P9_DOTL_DIRECT", 0o40000, "O_DIRECT"),
    ("P9_DOTL_LARGEFILE", 0o100000, "O_LARGEFILE"),
    ("P9_DOTL_DIRECTORY", 0o200000, "O_DIRECTORY"),
    ("P9_DOTL_NOFOLLOW", 0o400000, "O_NOFOLLOW"),
    ("P9_DOTL_NOATIME", 0o1000000, "O_NOATIME"),
    ("P9_DOTL_CLOEXEC", 0o2000000, "O_CLOEXEC"),
    ("P9_DOTL_SYNC", 0o4000000, "O_SYNC"),
]
ACCESS_MODES = [(os.O_RDONLY, 0o0), (os.O_WRONLY, 0o1), (os.O_RDWR, 0o2)]
# The flag bits (access mode aside) this host can express: O_* value 0 or
# missing (O_LARGEFILE on 64-bit glibc, O_DIRECT off Linux) means no counterpart.
HOST_FLAGS = [
    pytest.param(value, getattr(os, oname), id=name)
    for name, value, oname in DOTL_FLAGS
    if value > 0o3 and getattr(os, oname, 0)
]
ALL_DOTL_BITS = 0o3
for _name, _value, _ in DOTL_FLAGS:
    ALL_DOTL_BITS |= _value

# O_* values of other Linux ports (arch/*/include/uapi/asm/fcntl.h): arm64 moves
# four flags (its O_DIRECTORY is the generic O_DIRECT), alpha nearly all.
ARM64 = dict(
    O_CREAT=0o100, O_EXCL=0o200, O_NOCTTY=0o400, O_TRUNC=0o1000, O_APPEND=0o2000, O_NONBLOCK=0o4000,
    O_DSYNC=0o10000, O_ASYNC=0o20000, O_DIRECTORY=0o40000, O_NOFOLLOW=0o100000, O_DIRECT=0o200000,
    O_LARGEFILE=0o400000, O_NOATIME=0o1000000, O_CLOEXEC=0o2000000, O_SYNC=0o4010000,
)
ALPHA = dict(
    O_CREAT=0o1000, O_TRUNC=0o2000, O_EXCL=0o4000, O_NOCTTY=0o10000, O_NONBLOCK=0o4, O_APPEND=0o10,
    O_DSYNC=0o40000, O_ASYNC=0o20000, O_DIRECTORY=0o100000, O_NOFOLLOW=0o200000, O_LARGEFILE=0o400000,
    O_DIRECT=0o2000000, O_NOATIME=0o4000000, O_CLOEXEC=0o10000000, O_SYNC=0o20000000 | 0o40000,
)


@pytest.mark.parametrize("name,value,_oname", DOTL_FLAGS)
def test_wire_values_are_linux_9p_h(name, value, _oname):
    assert getattr(m, name) == value


@pytest.mark.parametrize("os_acc,wire_acc", ACCESS_MODES)
def test_access_modes_map_both_ways(os_acc, wire_acc):
    assert m.dotl_flags_from_os(os_acc) == wire_acc
    assert m.dotl_flags_to_os(wire_acc) == os_acc


def test_noaccess_opens_read_only_and_o_accmode_sends_noaccess():
    assert m.dotl_flags_to_os(m.P9_DOTL_NOACCESS) == os.O_RDONLY
    assert m.dotl_flags_from_os(os.O_ACCMODE) == m.P9_DOTL_NOACCESS


@pytest.mark.parametrize("bit,oflag", HOST_FLAGS)
def test_each_host_flag_maps_both_ways(bit, oflag):
    assert m.dotl_flags_to_os(bit) == oflag
    sent = m.dotl_flags_from_os(oflag)
    if bit == m.P9_DOTL_SYNC and os.O_SYNC & os.O_DSYNC == os.O_DSYNC:
        # Linux's O_SYNC is __O_SYNC | O_DSYNC: both go on the wire, as x86 sends it.
        assert sent == m.P9_DOTL_SYNC | m.P9_DOTL_DSYNC
    else:
        assert sent == bit


@pytest.mark.parametrize("os_acc,_wire_acc", ACCESS_MODES)
@pytest.mark.parametrize("bit,oflag", HOST_FLAGS)
def test_os_flags_round_trip(bit, oflag, os_acc, _wire_acc):
    flags = os_acc | oflag
    assert m.dotl_flags_to_os(m.dotl_flags_from_os(flags)) == flags


def test_every_host_flag_at_once_round_trips():
    flags = os.O_RDWR
    for p in HOST_FLAGS:
        flags |= p.values[1]
    wire = m.dotl_flags_from_os(flags)
    assert m.dotl_flags_to_os(wire) == flags
    assert m.dotl_flags_from_os(m.dotl_flags_to_os(wire)) == wire


def test_unknown_wire_bits_are_masked():
    unknown = 0xFFFFFFFF & ~ALL_DOTL_BITS
    assert m.dotl_flags_to_os(unknown) == os.O_RDONLY
    assert m.dotl_flags_to_os(unknown | m.P9_DOTL_WRONLY | m.P9_DOTL_TRUNC) == os.O_WRONLY | os.O_TRUNC


def test_host_bits_without_a_counterpart_are_dropped():
    if not hasattr(os, "O_PATH"):
        pytest.skip("no O_PATH on this host")
    assert m.dotl_flags_from_os(os.O_PATH | os.O_WRONLY) == m.P9_DOTL_WRONLY


def test_wire_bits_without_a_host_counterpart_are_masked():
    missing = [value for _name, value, oname in DOTL_FLAGS if value > 0o3 and not getattr(os, oname, 0)]
    for bit in missing:  # e.g. P9_DOTL_LARGEFILE where O_LARGEFILE is 0 (64-bit glibc)
        assert m.dotl_flags_to_os(bit | m.P9_DOTL_RDWR) == os.O_RDWR


@pytest.mark.parametrize("arch", [ARM64, ALPHA], ids=["arm64", "alpha"])
def test_other_ports_o_values_go_on_the_wire_as_9p2000l(monkeypatch, arch):
    monkeypatch.setattr(m, "_DOTL_OS_PAIRS", m._dotl_os_pairs(SimpleNamespace(**arch)))
    host = arch["O_TRUNC"] | arch["O_NONBLOCK"] | arch["O_DIRECTORY"] | arch["O_NOFOLLOW"] | os.O_WRONLY
    wire = m.P9_DOTL_TRUNC | m.P9_DOTL_NONBLOCK | m.P9_DOTL_DIRECTORY | m.P9_DOTL_NOFOLLOW | m.P9_DOTL_WRONLY
    assert m.dotl_flags_from_os(host) == wire
    assert m.dotl_flags_to_os(wire) == host
    for name, value, oname in DOTL_FLAGS:
        if value > 0o3:
            assert m.dotl_flags_to_os(value) == arch[oname], name
