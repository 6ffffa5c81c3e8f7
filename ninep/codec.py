"""Sans-IO encoder and decoder for 9P2000, 9P2000.u and 9P2000.L frames.

No I/O and no trio here (the h11 style): the server and client move bytes, this
module turns them into :mod:`ninep.messages` values and back.

Wire format (intro(5)): every message is ``size[4] type[1] tag[2] body``, all
integers little-endian, ``size`` counting the whole frame including itself.
Strings are ``n[2]`` then UTF-8 bytes; data is ``count[4]`` then bytes; a qid
is ``type[1] version[4] path[8]``.  The body layout of each message is its
class's ``WIRE`` spec (see :mod:`ninep.messages`).

Strings (intro(5): "UTF-8 text without NUL"): a string containing a NUL byte
is not a 9P string.  :func:`decode` raises :class:`ProtocolError` for one
(anywhere: message fields, Twalk names, stat records, readdir names), so a
server closes the connection that sent it rather than reading
``"9P2000\\0"`` as ``"9P2000"`` or passing ``"a\\0b"`` to a system call that
would stop at the NUL; :func:`encode` raises ``ValueError``.  Bytes that are
not UTF-8 (Linux file names are bytes) are kept: each such byte decodes to
the lone surrogate U+DC80 + byte (Python's ``surrogateescape``, as
``os.fsdecode``), so a decoded ``str`` gives back exactly the wire bytes with
``s.encode("utf-8", "surrogateescape")`` and file code that hands names to
``os`` functions reaches the very file the client named.  File code that
needs text must expect such surrogates (``str.isprintable`` is False for them;
``s.encode()`` without an error handler raises UnicodeEncodeError).

Speed: at import, for every (message class, dialect) pair this module writes
the source of one specialised encoder and one decoder, merging every run of
fixed-size fields (the header included, when encoding) into one precompiled
:class:`struct.Struct`, and compiles it once.  Encoding Rgetattr is then one
``Struct.pack`` call; decoding Tgetattr is one ``unpack_from`` after the header.

Errors: :func:`decode` and :class:`FrameReader` raise only
:class:`ninep.errors.ProtocolError` for bad bytes.  :func:`encode` raises
``ValueError`` for field values that do not fit their wire type (an integer
out of range, a string over 65535 bytes or with a NUL, a frame over 4 GiB)
and ``TypeError`` for something that is not a message.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from struct import Struct
from types import MappingProxyType

from .errors import ProtocolError
from .messages import HEADER_SIZE, MESSAGE_TYPES, Dialect, Message, Stat
from .qid import Qid

__all__ = [
    "encode",
    "encoders",
    "decode",
    "FrameReader",
    "pack_dirent",
    "unpack_dirents",
    "pack_stat",
    "unpack_stats",
]

_HDR = Struct("<IBH")
_U16 = Struct("<H")
_U32 = Struct("<I")
_QID = Struct("<BIQ")
_N_IDS = Struct("<III")
# stat(5) up to the strings: size[2] type[2] dev[4] qid[13] mode[4] atime[4] mtime[4] length[8]
_STAT_FIX = Struct("<HHIBIQIIIQ")
# 9P2000.L readdir entry up to the name: qid[13] offset[8] type[1] name-length[2]
_DIRENT = Struct("<BIQQBH")

_INT_FMT = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q"}


# --------------------------------------------------------------------------
# Helpers for the variable-length kinds (also used by the generated code).
# --------------------------------------------------------------------------


def _short(where: str, field: str) -> ProtocolError:
    return ProtocolError(f"{where}: truncated in field {field!r}")


def _nul(where: str, field: str) -> ProtocolError:
    return ProtocolError(f"{where}: NUL byte in string field {field!r}")


def _str_bytes(s: str, field: str) -> bytes:
    """The wire bytes of a 9P string; ValueError if it contains NUL."""
    b = s.encode("utf-8", "surrogateescape")
    if 0 in b:
        raise ValueError(f"NUL in 9P string field {field!r}")
    return b


def _pack_strs(strs: Sequence[str]) -> bytes:
    parts = [_U16.pack(len(strs))]
    for s in strs:
        b = _str_bytes(s, "wname")
        parts.append(_U16.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def _read_strs(b, o: int, n: int, count: int, where: str, field: str) -> tuple[tuple[str, ...], int]:
    out = []
    for _ in range(count):
        if o + 2 > n:
            raise _short(where, field)
        (ln,) = _U16.unpack_from(b, o)
        o += 2
        e = o + ln
        if e > n:
            raise _short(where, field)
        if b.find(0, o, e) >= 0:
            raise _nul(where, field)
        out.append(str(b[o:e], "utf-8", "surrogateescape"))
        o = e
    return tuple(out), o


def _pack_qids(qids: Sequence[Qid]) -> bytes:
    pack = _QID.pack
    return _U16.pack(len(qids)) + b"".join([pack(q.type, q.version, q.path) for q in qids])


def _read_qids(b, o: int, n: int, count: int, where: str, field: str) -> tuple[tuple[Qid, ...], int]:
    e = o + 13 * count
    if e > n:
        raise _short(where, field)
    return tuple([Qid(*t) for t in _QID.iter_unpack(b[o:e])]), e


def _is_u(dialect: Dialect) -> bool:
    return dialect == Dialect.U


def _pack_stat(st: Stat, u: bool) -> bytes:
    names = [st.name, st.uid, st.gid, st.muid]
    if u:
        names.append(st.extension)
    enc = [_str_bytes(s, "stat") for s in names]
    size = 39 + sum(2 + len(e) for e in enc) + (12 if u else 0)
    q = st.qid
    parts = [
        _STAT_FIX.pack(
            size, st.type, st.dev, q.type, q.version, q.path, st.mode, st.atime, st.mtime, st.length
        )
    ]
    for e in enc:
        parts.append(_U16.pack(len(e)))
        parts.append(e)
    if u:
        parts.append(_N_IDS.pack(st.n_uid, st.n_gid, st.n_muid))
    return b"".join(parts)


def _pack_stat_n(st: Stat, u: bool) -> bytes:
    """The stat of Rstat/Twstat: n[2] then the stat record with its own size[2]."""
    b = _pack_stat(st, u)
    return _U16.pack(len(b)) + b


def _read_stat(b, o: int, end: int, u: bool, where: str) -> tuple[Stat, int]:
    """Parse one stat(5) record at ``o`` that must end by ``end``; return it and its end."""
    if o + 2 > end:
        raise _short(where, "stat size")
    (size,) = _U16.unpack_from(b, o)
    lim = o + 2 + size
    if lim > end:
        raise ProtocolError(f"{where}: stat size {size} runs past the end of its data")
    if o + _STAT_FIX.size > lim:
        raise _short(where, "stat")
    _, typ, dev, qt, qv, qp, mode, atime, mtime, length = _STAT_FIX.unpack_from(b, o)
    p = o + _STAT_FIX.size
    strs = []
    for _ in range(5 if u else 4):
        if p + 2 > lim:
            raise _short(where, "stat string")
        (ln,) = _U16.unpack_from(b, p)
        p += 2
        e = p + ln
        if e > lim:
            raise _short(where, "stat string")
        if b.find(0, p, e) >= 0:
            raise _nul(where, "stat string")
        strs.append(str(b[p:e], "utf-8", "surrogateescape"))
        p = e
    if u:
        if p + 12 > lim:
            raise _short(where, "stat n_uid")
        ids = _N_IDS.unpack_from(b, p)
        p += 12
        st = Stat(typ, dev, Qid(qt, qv, qp), mode, atime, mtime, length, *strs, *ids)
    else:
        st = Stat(typ, dev, Qid(qt, qv, qp), mode, atime, mtime, length, *strs)
    if p != lim:
        raise ProtocolError(f"{where}: {lim - p} bytes left over inside a stat record")
    return st, lim


def _read_stat_n(b, o: int, n: int, nbytes: int, u: bool, where: str) -> tuple[Stat, int]:
    e = o + nbytes
    if e > n:
        raise _short(where, "stat")
    st, end = _read_stat(b, o, e, u, where)
    if end != e:
        raise ProtocolError(f"{where}: stat n[2]={nbytes} does not match its size[2]+2={end - o}")
    return st, e


# --------------------------------------------------------------------------
# Code generation: one encoder and one decoder per (message class, dialect).
# --------------------------------------------------------------------------


def _wire_fields(cls: type[Message], dialect: Dialect) -> list[tuple[str, str]]:
    """``(name, kind)`` of the fields of ``cls`` that are on the wire in ``dialect``."""
    out = []
    for item in cls.WIRE.split():
        name, kind = item.split(":")
        if "/" in kind:
            kind, only = kind.split("/")
            if not ((dialect == Dialect.U and "u" in only) or (dialect == Dialect.L and "L" in only)):
                continue
        out.append((name, kind))
    return out


def _gen_encoder(cls: type[Message], dialect: Dialect):
    ns: dict = {
        "struct": struct,
        "_str_bytes": _str_bytes,
        "_pack_strs": _pack_strs,
        "_pack_qids": _pack_qids,
        "_pack_stat_n": _pack_stat_n,
        "_u": _is_u(dialect),
    }
    pre: list[str] = []
    segs: list[str] = []
    var_lens: list[str] = []
    fixed = 0
    fmt, exprs = "<IBH", ["_size", str(cls.TYPE), "m.tag"]

    def flush():
        nonlocal fmt, exprs, fixed
        if exprs:
            s = Struct(fmt)
            sname = f"_S{len(segs)}"
            ns[sname] = s
            segs.append(f"{sname}.pack({', '.join(exprs)})")
            fixed += s.size
        fmt, exprs = "<", []

    def var(v: str):
        flush()
        segs.append(v)
        var_lens.append(f"len({v})")

    for i, (name, kind) in enumerate(_wire_fields(cls, dialect)):
        v = f"v{i}"
        if kind in _INT_FMT:
            fmt += _INT_FMT[kind]
            exprs.append(f"m.{name}")
        elif kind == "qid":
            pre.append(f"{v} = m.{name}")
            fmt += "BIQ"
            exprs += [f"{v}.type", f"{v}.version", f"{v}.path"]
        elif kind == "s":
            pre.append(f"{v} = _str_bytes(m.{name}, {name!r})")
            fmt += "H"
            exprs.append(f"len({v})")
            var(v)
        elif kind == "data":
            pre.append(f"{v} = m.{name}")
            fmt += "I"
            exprs.append(f"len({v})")
            var(v)
        elif kind == "qids":
            pre.append(f"{v} = _pack_qids(m.{name})")
            var(v)
        elif kind == "strs":
            pre.append(f"{v} = _pack_strs(m.{name})")
            var(v)
        elif kind == "stat":
            pre.append(f"{v} = _pack_stat_n(m.{name}, _u)")
            var(v)
        else:  # pragma: no cover - a typo in messages.py
            raise AssertionError(f"{cls.__name__}: unknown wire kind {kind!r}")
    flush()
    size = " + ".join([str(fixed), *var_lens])
    if len(segs) == 1:
        ret = segs[0]
    elif len(segs) == 2:
        ret = f"{segs[0]} + {segs[1]}"
    else:
        ret = f"b''.join(({', '.join(segs)}))"
    body = "\n".join(f"        {line}" for line in [*pre, f"_size = {size}", f"return {ret}"])
    src = (
        f"def encode_{cls.__name__}(m):\n"
        f"    try:\n{body}\n"
        f"    except struct.error as e:\n"
        f"        raise ValueError(f'cannot encode {{m!r}}: {{e}}') from None\n"
    )
    exec(compile(src, f"<ninep.codec encode {cls.__name__} {dialect.value}>", "exec"), ns)
    return ns[f"encode_{cls.__name__}"]


def _gen_decoder(cls: type[Message], dialect: Dialect):
    where = cls.__name__
    ns: dict = {
        "_cls": cls,
        "Qid": Qid,
        "ProtocolError": ProtocolError,
        "_short": _short,
        "_nul": _nul,
        "_read_strs": _read_strs,
        "_read_qids": _read_qids,
        "_read_stat_n": _read_stat_n,
        "_u": _is_u(dialect),
    }
    wire = _wire_fields(cls, dialect)
    lines: list[str] = []
    args: list[str] = []
    # Fixed-size run being collected: struct format, output names, first field name.
    run: dict = {"fmt": "<", "outs": [], "first": None}
    post: list[str] = []  # reads of the variable-length field that ends the run
    final: list[str] = []  # qid constructions, done once everything is unpacked
    nstructs = 0

    def flush():
        nonlocal nstructs
        if run["outs"]:
            s = Struct(run["fmt"])
            sname = f"_S{nstructs}"
            nstructs += 1
            ns[sname] = s
            outs = ", ".join(run["outs"]) + ("," if len(run["outs"]) == 1 else "")
            lines.append(f"if o + {s.size} > n: raise _short({where!r}, {run['first']!r})")
            lines.append(f"{outs} = {sname}.unpack_from(b, o)")
            lines.append(f"o += {s.size}")
        lines.extend(post)
        post.clear()
        run.update(fmt="<", outs=[], first=None)

    def add(fmt: str, outs: list[str], name: str):
        if post:  # a variable-length field sits between: start a new run
            flush()
        run["fmt"] += fmt
        run["outs"] += outs
        run["first"] = run["first"] or name

    for i, (name, kind) in enumerate(wire):
        v = f"v{i}"
        args.append(v)
        if kind in _INT_FMT:
            add(_INT_FMT[kind], [v], name)
        elif kind == "qid":
            add("BIQ", [f"{v}t", f"{v}v", f"{v}p"], name)
            final.append(f"{v} = Qid({v}t, {v}v, {v}p)")
        elif kind in ("s", "data"):
            add("H" if kind == "s" else "I", [f"{v}n"], name)
            conv = "str(b[o:e], 'utf-8', 'surrogateescape')" if kind == "s" else "bytes(b[o:e])"
            post += [
                f"e = o + {v}n",
                f"if e > n: raise _short({where!r}, {name!r})",
                *([f"if b.find(0, o, e) >= 0: raise _nul({where!r}, {name!r})"] if kind == "s" else []),
                f"{v} = {conv}",
                "o = e",
            ]
        elif kind in ("qids", "strs"):
            add("H", [f"{v}n"], name)
            post.append(f"{v}, o = _read_{kind}(b, o, n, {v}n, {where!r}, {name!r})")
        elif kind == "stat":
            add("H", [f"{v}n"], name)
            post.append(f"{v}, o = _read_stat_n(b, o, n, {v}n, _u, {where!r})")
        else:  # pragma: no cover
            raise AssertionError(f"{cls.__name__}: unknown wire kind {kind!r}")

    all_fixed = all(kind in _INT_FMT or kind == "qid" for _, kind in wire)
    if all_fixed:
        size = HEADER_SIZE + Struct(run["fmt"]).size
        lines.append(
            f"if n != {size}: raise ProtocolError("
            f"f'{where}: frame is {{n}} bytes, expected {size}')"
        )
        if run["outs"]:
            sname = f"_S{nstructs}"
            ns[sname] = Struct(run["fmt"])
            outs = ", ".join(run["outs"]) + ("," if len(run["outs"]) == 1 else "")
            lines.append(f"{outs} = {sname}.unpack_from(b, 7)")
    else:
        lines.insert(0, "o = 7")
        flush()
        lines.append(
            f"if o != n: raise ProtocolError(f'{where}: {{n - o}} trailing bytes after the message')"
        )
    lines.extend(final)
    lines.append(f"return _cls({', '.join(['tag', *args])})")
    src = f"def decode_{where}(b, tag, n):\n" + "\n".join(f"    {ln}" for ln in lines) + "\n"
    exec(compile(src, f"<ninep.codec decode {where} {dialect.value}>", "exec"), ns)
    return ns[f"decode_{where}"]


def _check_defaults_trail() -> None:
    # Dialect-only fields are omitted from the decoder's positional call, so they must be last.
    for cls in MESSAGE_TYPES.values():
        kinds = [item.split(":")[1] for item in cls.WIRE.split()]
        seen_opt = False
        for k in kinds:
            if "/" in k:
                seen_opt = True
            elif seen_opt:  # pragma: no cover
                raise AssertionError(f"{cls.__name__}: dialect-only field before a common one")


_check_defaults_trail()

_ENCODERS: dict[Dialect, dict[type, object]] = {
    d: {cls: _gen_encoder(cls, d) for cls in MESSAGE_TYPES.values()} for d in Dialect
}
_ENCODER_VIEWS = {d: MappingProxyType(e) for d, e in _ENCODERS.items()}
_DECODERS: dict[Dialect, dict[int, object]] = {
    d: {t: _gen_decoder(cls, d) for t, cls in MESSAGE_TYPES.items()} for d in Dialect
}


# --------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------


def encode(msg: Message, dialect: Dialect) -> bytes:
    """The whole frame ``size[4] type[1] tag[2] body`` of ``msg`` in ``dialect`` (intro(5)).

    Fields that exist only in other dialects (e.g. Rerror.errno outside
    9P2000.u) are left out.  Raises ``ValueError`` when a value does not fit its
    wire type and ``TypeError`` when ``msg`` is not a message.
    """
    try:
        enc = _ENCODERS[dialect][type(msg)]
    except KeyError:
        if dialect not in _ENCODERS:
            raise ValueError(f"unknown 9P dialect {dialect!r}") from None
        raise TypeError(f"not a 9P message: {msg!r}") from None
    return enc(msg)


def encoders(dialect: Dialect) -> Mapping[type, Callable[[Message], bytes]]:
    """The encoder of each message class in ``dialect`` (read-only): for a
    server that encodes many replies in one dialect, one dict lookup instead
    of :func:`encode`'s two.  Each raises as :func:`encode` does."""
    return _ENCODER_VIEWS[dialect]


def decode(frame: bytes | bytearray | memoryview, dialect: Dialect) -> Message:
    """Parse one whole frame (size[4] included) into its message dataclass.

    Raises :class:`ProtocolError` (and nothing else, whatever the bytes) when
    the size field differs from ``len(frame)``, the type is unknown, a field,
    string, count or stat runs past the end, a string contains NUL, or bytes
    trail the last field.  Strings that are not UTF-8 (Linux file names are
    bytes) decode with surrogateescape, as os.fsdecode does, and encode back
    byte for byte.  ``ValueError`` only for an unknown ``dialect``.
    """
    if type(frame) is memoryview:
        frame = frame.tobytes()
    n = len(frame)
    if n < HEADER_SIZE:
        raise ProtocolError(f"frame of {n} bytes is shorter than the 7-byte header")
    size, typ, tag = _HDR.unpack_from(frame)
    if size != n:
        raise ProtocolError(f"size field {size} does not match the frame length {n}")
    try:
        dec = _DECODERS[dialect][typ]
    except KeyError:
        if dialect not in _DECODERS:
            raise ValueError(f"unknown 9P dialect {dialect!r}") from None
        raise ProtocolError(f"unknown message type {typ}") from None
    try:
        return dec(frame, tag, n)
    except ProtocolError:
        raise
    except Exception as e:  # belt and braces: bad bytes must only ever give ProtocolError
        raise ProtocolError(f"{MESSAGE_TYPES[typ].__name__}: malformed ({e})") from e


class FrameReader:
    """Cuts a byte stream into whole 9P frames (intro(5) size[4] framing).

    ``FrameReader(max_size)``: ``max_size`` (bytes, settable: the server lowers
    it to the negotiated msize after Tversion) is the largest frame accepted.
    :meth:`feed` appends received bytes; :meth:`frames` yields each complete
    frame as ``bytes``, leaving a partial one buffered.  Raises
    :class:`ProtocolError` as soon as a size field is < 7 or > ``max_size``;
    the stream cannot be resynchronised after that.  Each byte is copied once
    into the buffer and once into its frame (the buffer drops consumed bytes
    from the front, which bytearray does without moving the rest).
    """

    __slots__ = ("max_size", "_buf")

    def __init__(self, max_size: int):
        self.max_size = max_size
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes received from the peer."""
        self._buf += data

    def next_frame(self) -> bytes | None:
        """The next complete frame (removed from the buffer), or None when
        the buffer holds only part of one.  ProtocolError as :meth:`frames`."""
        buf = self._buf
        have = len(buf)
        if have < 4:
            return None
        (size,) = _U32.unpack_from(buf)
        if size < HEADER_SIZE:
            raise ProtocolError(f"frame size {size} is smaller than the 7-byte header")
        if size > self.max_size:
            raise ProtocolError(f"frame size {size} exceeds the limit {self.max_size}")
        if have < size:
            return None
        if have == size:  # the usual case: the buffer holds just this frame
            frame = bytes(buf)
            buf.clear()
            return frame
        # Release both views before resizing buf (bytearray refuses while exported).
        with memoryview(buf) as mv, mv[:size] as view:
            frame = view.tobytes()
        del buf[:size]
        return frame

    def frames(self) -> Iterator[bytes]:
        """Yield every complete frame buffered so far, in order.  Stopping the
        iteration early leaves the rest buffered."""
        while (frame := self.next_frame()) is not None:
            yield frame

    def __len__(self) -> int:
        """Bytes buffered that do not yet form a whole frame (or are not yet consumed)."""
        return len(self._buf)


def pack_dirent(qid: Qid, offset: int, dtype: int, name: str) -> bytes:
    """One 9P2000.L Rreaddir entry: qid[13] offset[8] type[1] name[s].

    ``offset`` (u64) is the opaque cookie of the *next* entry; ``dtype`` (u8)
    is the Linux DT_* type.  Raises ``ValueError`` when a value does not fit
    or ``name`` contains NUL.
    """
    nb = _str_bytes(name, "name")
    try:
        return _DIRENT.pack(qid.type, qid.version, qid.path, offset, dtype, len(nb)) + nb
    except struct.error as e:
        raise ValueError(f"cannot pack dirent {name!r}: {e}") from None


def unpack_dirents(data: bytes | bytearray | memoryview) -> list[tuple[Qid, int, int, str]]:
    """Parse Rreaddir data into ``(qid, offset, dtype, name)`` tuples.

    Raises :class:`ProtocolError` for a truncated entry or a name with NUL.
    """
    out = []
    n = len(data)
    o = 0
    while o < n:
        if o + _DIRENT.size > n:
            raise ProtocolError("readdir data: truncated entry")
        qt, qv, qp, off, dtype, ln = _DIRENT.unpack_from(data, o)
        o += _DIRENT.size
        e = o + ln
        if e > n:
            raise ProtocolError("readdir data: truncated name")
        if 0 in data[o:e]:
            raise ProtocolError("readdir data: NUL byte in a name")
        out.append((Qid(qt, qv, qp), off, dtype, str(data[o:e], "utf-8", "surrogateescape")))
        o = e
    return out


def pack_stat(stat: Stat, dialect: Dialect) -> bytes:
    """One stat(5) record with its size[2] prefix, as 9P2000/.u directory reads return.

    The .u fields (extension, n_uid, n_gid, n_muid) are included only for
    9P2000.u.  Raises ``ValueError`` when a value does not fit or a string
    contains NUL.
    """
    try:
        return _pack_stat(stat, _is_u(dialect))
    except struct.error as e:
        raise ValueError(f"cannot pack {stat!r}: {e}") from None


def unpack_stats(data: bytes | bytearray | memoryview, dialect: Dialect) -> list[Stat]:
    """Parse a 9P2000/.u directory read (concatenated stat(5) records) into Stats.

    Raises :class:`ProtocolError` for a truncated record, a size[2] that does not
    match its contents, a string with NUL.
    """
    u = _is_u(dialect)
    n = len(data)
    o = 0
    out = []
    while o < n:
        st, o = _read_stat(data, o, n, u, "stat data")
        out.append(st)
    return out
