"""Tests of the sans-IO 9P codec (ninep/codec.py) and the message table (ninep/messages.py).

Round trips are property tests generated from each class's WIRE spec; golden
vectors are worked out by hand from intro(5)/version(5)/walk(5)/error(5) and
Linux's 9P2000.L layouts, and a few are also cross-checked against py9p (p9fs),
an independent 9P implementation.
"""

from __future__ import annotations

import os

import io
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ninep import messages as m
from ninep.codec import (
    FrameReader,
    decode,
    encode,
    pack_dirent,
    pack_stat,
    unpack_dirents,
    unpack_stats,
)
from ninep.errors import ProtocolError
from ninep.messages import MESSAGE_TYPES, NONUNAME, NOTAG, Dialect, Stat
from ninep.qid import QTDIR, QTFILE, Qid

FAST = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))

# --------------------------------------------------------------------------
# Strategies and examples built from the WIRE specs.
# --------------------------------------------------------------------------

_BITS = {"u8": 8, "u16": 16, "u32": 32, "u64": 64}
texts = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=12)  # intro(5): no NUL in strings
qids = st.builds(Qid, st.integers(0, 0xFF), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))


def on_wire(only: str | None, dialect: Dialect) -> bool:
    """Whether a field marked ``/only`` in WIRE is sent in ``dialect``."""
    if only is None:
        return True
    return (dialect is Dialect.U and "u" in only) or (dialect is Dialect.L and "L" in only)


def spec(cls) -> list[tuple[str, str, str | None]]:
    out = []
    for item in cls.WIRE.split():
        name, kind = item.split(":")
        kind, _, only = kind.partition("/")
        out.append((name, kind, only or None))
    return out


def stats(dialect: Dialect):
    u32, u16 = st.integers(0, 2**32 - 1), st.integers(0, 0xFFFF)
    common = dict(
        type=u16, dev=u32, qid=qids, mode=u32, atime=u32, mtime=u32,
        length=st.integers(0, 2**64 - 1), name=texts, uid=texts, gid=texts, muid=texts,
    )
    if dialect is Dialect.U:
        common.update(extension=texts, n_uid=u32, n_gid=u32, n_muid=u32)
    return st.builds(Stat, **common)


def kind_strategy(kind: str, dialect: Dialect):
    if kind in _BITS:
        return st.integers(0, 2 ** _BITS[kind] - 1)
    return {
        "s": texts,
        "qid": qids,
        "qids": st.lists(qids, max_size=4).map(tuple),
        "strs": st.lists(texts, max_size=4).map(tuple),
        "data": st.binary(max_size=40),
        "stat": stats(dialect),
    }[kind]


def message_strategy(cls, dialect: Dialect):
    """Messages of ``cls`` whose off-wire (other-dialect) fields keep their defaults."""
    kw = {"tag": st.integers(0, 0xFFFF)}
    for name, kind, only in spec(cls):
        if on_wire(only, dialect):
            kw[name] = kind_strategy(kind, dialect)
    return st.builds(cls, **kw)


SAMPLE_STAT = Stat(0, 0, Qid(QTFILE, 3, 42), 0o644, 1_700_000_000, 1_700_000_001, 5,
                   "f", "glenda", "sys", "glenda")
SAMPLE_STAT_U = Stat(0, 0, Qid(QTFILE, 3, 42), 0o644, 1_700_000_000, 1_700_000_001, 5,
                     "f", "glenda", "sys", "glenda", "", 1000, 1000, 1000)


def example(cls, dialect: Dialect):
    """One fixed message of ``cls`` with every variable field non-empty."""
    args = []
    for i, (_, kind, only) in enumerate(spec(cls)):
        if not on_wire(only, dialect):
            continue
        args.append({
            "s": "né",
            "qid": Qid(QTDIR, 7, 2**40 + i),
            "qids": (Qid(QTDIR, 1, 2), Qid(QTFILE, 0, 3)),
            "strs": ("a", "bc"),
            "data": b"xyz",
            "stat": SAMPLE_STAT_U if dialect is Dialect.U else SAMPLE_STAT,
        }.get(kind, i + 1))
    return cls(0x1234, *args)


ALL = [(cls, d) for cls in MESSAGE_TYPES.values() for d in Dialect]
IDS = [f"{cls.__name__}-{d.value}" for cls, d in ALL]


def with_size(frame: bytes) -> bytes:
    """``frame`` with its size[4] rewritten to its length."""
    return struct.pack("<I", len(frame)) + frame[4:]


# --------------------------------------------------------------------------
# The message table.
# --------------------------------------------------------------------------


def test_registry_has_every_type_of_the_three_dialects():
    assert len(MESSAGE_TYPES) == 66
    assert MESSAGE_TYPES[100] is m.Tversion and MESSAGE_TYPES[7] is m.Rlerror
    assert MESSAGE_TYPES[77] is m.Runlinkat and 106 not in MESSAGE_TYPES  # no Terror
    for t, cls in MESSAGE_TYPES.items():
        assert cls.TYPE == t and issubclass(cls, m.Message)
        assert cls.__dataclass_params__.frozen and hasattr(cls, "__slots__")
        assert cls.__dataclass_fields__["tag"] is list(cls.__dataclass_fields__.values())[0]


def test_dialect_values_are_the_version_strings():
    assert [d.value for d in Dialect] == ["9P2000", "9P2000.u", "9P2000.L"]
    assert Dialect("9P2000.L") is Dialect.L


# --------------------------------------------------------------------------
# Round trips.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("cls,dialect", ALL, ids=IDS)
@FAST
@given(data=st.data())
def test_round_trip(cls, dialect, data):
    msg = data.draw(message_strategy(cls, dialect))
    frame = encode(msg, dialect)
    assert struct.unpack_from("<IBH", frame) == (len(frame), cls.TYPE, msg.tag)
    assert decode(frame, dialect) == msg
    assert decode(bytearray(frame), dialect) == msg
    assert decode(memoryview(frame), dialect) == msg


@pytest.mark.parametrize("cls,dialect", ALL, ids=IDS)
def test_example_round_trip(cls, dialect):
    msg = example(cls, dialect)
    assert decode(encode(msg, dialect), dialect) == msg


# --------------------------------------------------------------------------
# Golden bytes, worked out by hand from the manual pages.
# --------------------------------------------------------------------------


def test_golden_tversion():
    # version(5): size[4] Tversion tag[2] msize[4] version[s]; 7+4+2+8 = 21 bytes.
    frame = bytes.fromhex("15000000" "64" "ffff" "00200000" "0800") + b"9P2000.L"
    msg = m.Tversion(NOTAG, 8192, "9P2000.L")
    for d in Dialect:
        assert encode(msg, d) == frame
        assert decode(frame, d) == msg


def test_golden_twalk_two_names():
    # walk(5): fid[4] newfid[4] nwname[2] nwname*(wname[s]); 7+4+4+2+3+4 = 24 bytes.
    frame = bytes.fromhex("18000000" "6e" "0100" "02000000" "03000000" "0200"
                          "0100" "61" "0200" "6263")
    msg = m.Twalk(1, 2, 3, ("a", "bc"))
    assert encode(msg, Dialect.L) == frame
    assert decode(frame, Dialect.L) == msg


def test_golden_rwalk():
    frame = bytes.fromhex("16000000" "6f" "0900" "0100" "80" "05000000" "0600000000000000")
    msg = m.Rwalk(9, (Qid(QTDIR, 5, 6),))
    assert encode(msg, Dialect.P2000) == frame and decode(frame, Dialect.P2000) == msg


def test_golden_rgetattr():
    # valid[8] qid[13] mode[4] uid[4] gid[4] nlink[8] rdev[8] size[8] blksize[8] blocks[8]
    # then 4 x (sec[8] nsec[8]) then gen[8] data_version[8]: 7+8+13+12+15*8 = 160 bytes.
    u64 = lambda v: struct.pack("<Q", v)  # noqa: E731
    frame = (
        bytes.fromhex("a0000000" "19" "0500")
        + u64(0x7FF)
        + bytes.fromhex("00" "00000000") + u64(42)
        + bytes.fromhex("a4810000" "e8030000" "e9030000")  # 0o100644, uid 1000, gid 1001
        + u64(1) + u64(0) + u64(5) + u64(4096) + u64(1)
        + u64(1_700_000_000) + u64(1) + u64(1_700_000_002) + u64(3)
        + u64(1_700_000_004) + u64(5) + u64(0) + u64(0)
        + u64(0) + u64(0)
    )
    assert len(frame) == 160
    msg = m.Rgetattr(5, 0x7FF, Qid(QTFILE, 0, 42), 0o100644, 1000, 1001, 1, 0, 5, 4096, 1,
                     1_700_000_000, 1, 1_700_000_002, 3, 1_700_000_004, 5, 0, 0, 0, 0)
    assert encode(msg, Dialect.L) == frame
    assert decode(frame, Dialect.L) == msg


def test_golden_rerror_u_carries_errno():
    # error(5) + 9P2000.u: ename[s] errno[4].
    msg = m.Rerror(5, "no", 2)
    assert encode(msg, Dialect.U) == bytes.fromhex("0f000000" "6b" "0500" "0200" "6e6f" "02000000")
    assert encode(msg, Dialect.P2000) == bytes.fromhex("0b000000" "6b" "0500" "0200" "6e6f")
    assert decode(encode(msg, Dialect.P2000), Dialect.P2000) == m.Rerror(5, "no", 0)


def test_golden_rlerror_and_tclunk():
    assert encode(m.Rlerror(3, 2), Dialect.L) == bytes.fromhex("0b000000" "07" "0300" "02000000")
    assert encode(m.Tclunk(3, 17), Dialect.L) == bytes.fromhex("0b000000" "78" "0300" "11000000")
    assert encode(m.Rclunk(3), Dialect.L) == bytes.fromhex("07000000" "79" "0300")


def test_golden_dirent():
    # 9P2000.L readdir entry: qid[13] offset[8] type[1] name[s].
    b = pack_dirent(Qid(QTDIR, 0, 2), 7, 4, "etc")
    assert b == bytes.fromhex("80" "00000000" "0200000000000000" "0700000000000000" "04"
                              "0300") + b"etc"


# --------------------------------------------------------------------------
# Dialect differences.
# --------------------------------------------------------------------------


def test_tattach_n_uname_only_in_u_and_l():
    msg = m.Tattach(1, 0, m.NOFID, "glenda", "", 1000)
    plain = encode(msg, Dialect.P2000)
    assert len(plain) == 7 + 4 + 4 + 2 + 6 + 2
    assert decode(plain, Dialect.P2000) == m.Tattach(1, 0, m.NOFID, "glenda", "", NONUNAME)
    for d in (Dialect.U, Dialect.L):
        frame = encode(msg, d)
        assert frame == with_size(plain + struct.pack("<I", 1000))
        assert decode(frame, d) == msg
    with pytest.raises(ProtocolError):  # a 9P2000 Tattach is short for .L
        decode(plain, Dialect.L)


def test_tauth_n_uname_only_in_u_and_l():
    msg = m.Tauth(1, 5, "u", "a", 7)
    assert len(encode(msg, Dialect.P2000)) + 4 == len(encode(msg, Dialect.L))
    assert decode(encode(msg, Dialect.U), Dialect.U) == msg


def test_tcreate_extension_only_in_u():
    msg = m.Tcreate(1, 2, "ln", m.DMSYMLINK | 0o777, m.OREAD, "/target")
    u = encode(msg, Dialect.U)
    assert u.endswith(b"\x07\x00/target")
    assert decode(u, Dialect.U) == msg
    for d in (Dialect.P2000, Dialect.L):
        assert len(encode(msg, d)) == len(u) - 9
        assert decode(encode(msg, d), d) == m.Tcreate(1, 2, "ln", m.DMSYMLINK | 0o777, m.OREAD)


def test_stat_u_fields():
    plain = pack_stat(SAMPLE_STAT_U, Dialect.P2000)
    u = pack_stat(SAMPLE_STAT_U, Dialect.U)
    assert len(u) == len(plain) + 2 + 12  # extension[s] n_uid[4] n_gid[4] n_muid[4]
    assert struct.unpack_from("<H", plain)[0] == len(plain) - 2
    assert struct.unpack_from("<H", u)[0] == len(u) - 2
    assert unpack_stats(u, Dialect.U) == [SAMPLE_STAT_U]
    assert unpack_stats(plain, Dialect.P2000) == [SAMPLE_STAT]
    with pytest.raises(ProtocolError):
        unpack_stats(u, Dialect.P2000)  # leftover bytes inside the record
    with pytest.raises(ProtocolError):
        unpack_stats(plain, Dialect.U)  # record too short for the .u fields


def test_rstat_has_n_before_the_stat():
    frame = encode(m.Rstat(1, SAMPLE_STAT), Dialect.P2000)
    rec = pack_stat(SAMPLE_STAT, Dialect.P2000)
    assert frame == with_size(bytes.fromhex("00000000" "7d" "0100") + struct.pack("<H", len(rec)) + rec)
    bad = bytearray(frame)
    bad[7:9] = struct.pack("<H", len(rec) - 1)  # n[2] disagrees with size[2]
    with pytest.raises(ProtocolError):
        decode(with_size(bytes(bad[:-1])), Dialect.P2000)


# --------------------------------------------------------------------------
# Bad bytes: only ever ProtocolError.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("cls,dialect", ALL, ids=IDS)
def test_every_proper_prefix_is_rejected(cls, dialect):
    frame = encode(example(cls, dialect), dialect)
    for k in range(len(frame)):
        prefix = with_size(frame[:k]) if k >= 4 else frame[:k]
        with pytest.raises(ProtocolError):
            decode(prefix, dialect)


@pytest.mark.parametrize("cls,dialect", ALL, ids=IDS)
def test_trailing_bytes_are_rejected(cls, dialect):
    frame = encode(example(cls, dialect), dialect)
    with pytest.raises(ProtocolError, match="trailing|expected"):
        decode(with_size(frame + b"\0"), dialect)


def test_size_field_must_match_frame_length():
    frame = encode(m.Tclunk(1, 2), Dialect.L)
    with pytest.raises(ProtocolError, match="size field"):
        decode(frame + b"\0", Dialect.L)
    with pytest.raises(ProtocolError, match="size field"):
        decode(frame[:-1], Dialect.L)


@pytest.mark.parametrize("dialect", list(Dialect))
def test_unknown_types_are_rejected(dialect):
    for t in range(256):
        if t not in MESSAGE_TYPES:
            with pytest.raises(ProtocolError, match="unknown message type"):
                decode(bytes([7, 0, 0, 0, t, 0, 0]), dialect)


def test_non_utf8_names_round_trip_as_surrogate_escapes():
    """Linux file names are bytes: a name that is not UTF-8 must not break the
    connection, and must come back byte for byte (os.fsdecode's convention)."""
    walk = with_size(bytes.fromhex("00000000" "6e" "0100" "01000000" "02000000" "0100" "0100" "ff"))
    msg = decode(walk, Dialect.L)
    assert msg.wnames == ("\udcff",) and msg.wnames[0] == os.fsdecode(b"\xff")
    assert encode(msg, Dialect.L) == walk
    ent = pack_dirent(Qid(0, 0, 1), 1, 8, os.fsdecode(b"caf\xe9"))
    assert ent.endswith(b"caf\xe9")
    assert unpack_dirents(ent)[0][3] == os.fsdecode(b"caf\xe9")


def test_counts_beyond_the_frame_are_rejected():
    walk = with_size(bytes.fromhex("00000000" "6e" "0100" "01000000" "02000000" "0500"))
    with pytest.raises(ProtocolError, match="wnames"):
        decode(walk, Dialect.L)
    rread = with_size(bytes.fromhex("00000000" "75" "0100" "ffffffff" "00"))
    with pytest.raises(ProtocolError, match="data"):
        decode(rread, Dialect.L)
    rwalk = with_size(bytes.fromhex("00000000" "6f" "0100" "ffff") + bytes(13))
    with pytest.raises(ProtocolError, match="wqids"):
        decode(rwalk, Dialect.L)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64), dialect=st.sampled_from(list(Dialect)))
def test_random_bytes_only_raise_protocol_error(raw, dialect):
    try:
        decode(raw, dialect)
    except ProtocolError:
        pass


@settings(max_examples=600, deadline=None)
@given(t=st.sampled_from(sorted(MESSAGE_TYPES)), body=st.binary(max_size=80),
       dialect=st.sampled_from(list(Dialect)))
def test_random_bodies_only_raise_protocol_error(t, body, dialect):
    frame = struct.pack("<IBH", 7 + len(body), t, 1) + body
    try:
        msg = decode(frame, dialect)
    except ProtocolError:
        return
    assert encode(msg, dialect) == frame  # whatever decodes re-encodes byte for byte


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=80), dialect=st.sampled_from(list(Dialect)))
def test_random_directory_data_only_raises_protocol_error(raw, dialect):
    for fn in (unpack_dirents, lambda b: unpack_stats(b, dialect)):
        try:
            fn(raw)
        except ProtocolError:
            pass


# --------------------------------------------------------------------------
# Encoding errors.
# --------------------------------------------------------------------------


def test_encode_rejects_values_that_do_not_fit():
    with pytest.raises(ValueError):
        encode(m.Tclunk(1, 2**32), Dialect.L)
    with pytest.raises(ValueError):
        encode(m.Tflush(-1, 1), Dialect.L)
    with pytest.raises(ValueError):
        encode(m.Rreadlink(1, "x" * 70000), Dialect.L)
    with pytest.raises(TypeError):
        encode(Qid(0, 0, 0), Dialect.L)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        pack_dirent(Qid(0, 0, 1), -1, 0, "x")


# --------------------------------------------------------------------------
# FrameReader.
# --------------------------------------------------------------------------


STREAM_MSGS = [
    m.Tversion(NOTAG, 8192, "9P2000.L"),
    m.Tclunk(1, 2),
    m.Twrite(2, 3, 0, b"hello" * 10),
    m.Rflush(4),
]


def test_frame_reader_split_at_every_byte():
    frames = [encode(x, Dialect.L) for x in STREAM_MSGS]
    stream = b"".join(frames)
    for i in range(len(stream) + 1):
        r = FrameReader(8192)
        r.feed(stream[:i])
        got = list(r.frames())
        r.feed(stream[i:])
        got += list(r.frames())
        assert got == frames
        assert len(r) == 0


def test_frame_reader_byte_by_byte():
    frames = [encode(x, Dialect.L) for x in STREAM_MSGS]
    r = FrameReader(8192)
    got = []
    for b in b"".join(frames):
        r.feed(bytes([b]))
        got += r.frames()
    assert [decode(f, Dialect.L) for f in got] == STREAM_MSGS


def test_frame_reader_rejects_oversize_and_undersize():
    r = FrameReader(100)
    r.feed(struct.pack("<I", 101))  # rejected from the size field alone
    with pytest.raises(ProtocolError, match="exceeds"):
        list(r.frames())
    r = FrameReader(100)
    r.feed(struct.pack("<I", 6) + b"\0\0\0")
    with pytest.raises(ProtocolError, match="smaller"):
        list(r.frames())


def test_frame_reader_max_size_can_be_lowered():
    r = FrameReader(65536)
    big = encode(m.Rread(1, bytes(5000)), Dialect.L)
    r.feed(big)
    assert list(r.frames()) == [big]
    r.max_size = 4096
    r.feed(big)
    with pytest.raises(ProtocolError):
        list(r.frames())


def test_frame_reader_many_frames_in_one_feed():
    frame = encode(m.Tgetattr(1, 2, m.P9_GETATTR_BASIC), Dialect.L)
    r = FrameReader(8192)
    r.feed(frame * 5000 + frame[:3])
    assert sum(1 for _ in r.frames()) == 5000
    assert len(r) == 3


# --------------------------------------------------------------------------
# Directory helpers.
# --------------------------------------------------------------------------


@FAST
@given(entries=st.lists(st.tuples(qids, st.integers(0, 2**64 - 1), st.integers(0, 255), texts),
                        max_size=6))
def test_dirents_round_trip(entries):
    data = b"".join(pack_dirent(*e) for e in entries)
    assert unpack_dirents(data) == entries
    if data:
        with pytest.raises(ProtocolError):
            unpack_dirents(data[:-1])


@pytest.mark.parametrize("dialect", list(Dialect))
@FAST
@given(data=st.data())
def test_stats_round_trip(dialect, data):
    sts = data.draw(st.lists(stats(dialect), max_size=4))
    blob = b"".join(pack_stat(s, dialect) for s in sts)
    assert unpack_stats(blob, dialect) == sts
    if blob:
        with pytest.raises(ProtocolError):
            unpack_stats(blob[:-1], dialect)


# --------------------------------------------------------------------------
# Cross-check against py9p (p9fs), an independent implementation.
# --------------------------------------------------------------------------


def py9p_bytes(fcall_type: int, dotu: int, **fields) -> bytes:
    from py9p import py9p

    fc = py9p.Fcall(fcall_type, fields.pop("tag"))
    for k, v in fields.items():
        setattr(fc, k, v)
    out = io.BytesIO()
    py9p.Marshal9P(dotu=dotu).send(out, fc)
    return out.getvalue()


def test_matches_py9p():
    from py9p import py9p

    assert encode(m.Tversion(NOTAG, 8192, "9P2000.u"), Dialect.U) == py9p_bytes(
        py9p.Tversion, 1, tag=NOTAG, msize=8192, version="9P2000.u")
    assert encode(m.Tattach(3, 1, m.NOFID, "glenda", "ctl", 1000), Dialect.U) == py9p_bytes(
        py9p.Tattach, 1, tag=3, fid=1, afid=m.NOFID, uname="glenda", aname="ctl", uidnum=1000)
    assert encode(m.Tattach(3, 1, m.NOFID, "glenda", "ctl"), Dialect.P2000) == py9p_bytes(
        py9p.Tattach, 0, tag=3, fid=1, afid=m.NOFID, uname="glenda", aname="ctl")
    assert encode(m.Twalk(4, 1, 2, ("usr", "glenda")), Dialect.L) == py9p_bytes(
        py9p.Twalk, 0, tag=4, fid=1, newfid=2, wname=["usr", "glenda"])
    assert encode(m.Rerror(5, "gone", 2), Dialect.U) == py9p_bytes(
        py9p.Rerror, 1, tag=5, ename="gone", errno=2)
    assert encode(m.Tcreate(6, 1, "ln", 0o777, 0, "/x"), Dialect.U) == py9p_bytes(
        py9p.Tcreate, 1, tag=6, fid=1, name="ln", perm=0o777, mode=0, extension="/x")
    assert encode(m.Twrite(7, 1, 10, b"abc"), Dialect.L) == py9p_bytes(
        py9p.Twrite, 0, tag=7, fid=1, offset=10, data=b"abc")
    assert encode(m.Tlcreate(8, 1, "f", 0o2, 0o644, 100), Dialect.L) == py9p_bytes(
        py9p.Tlcreate, 0, tag=8, fid=1, name="f", flags=0o2, mode=0o644, gid=100)
    for dialect, dotu, sample in ((Dialect.P2000, 0, SAMPLE_STAT), (Dialect.U, 1, SAMPLE_STAT_U)):
        d = py9p.Dir(dotu, sample.type, sample.dev, py9p.Qid(sample.qid.type, sample.qid.version,
                     sample.qid.path), sample.mode, sample.atime, sample.mtime, sample.length,
                     sample.name, sample.uid, sample.gid, sample.muid, sample.extension,
                     sample.n_uid, sample.n_gid, sample.n_muid)
        assert encode(m.Rstat(9, sample), dialect) == py9p_bytes(py9p.Rstat, dotu, tag=9, stat=[d])
