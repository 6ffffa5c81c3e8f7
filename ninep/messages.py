"""The 9P messages as values: one frozen dataclass per message type.

Pure data, no I/O and no trio (the sans-IO style of h11): :mod:`ninep.codec`
turns these into wire bytes and back.  Three dialects share one set of classes:

- 9P2000 (Plan 9 intro(5) and the section-5 pages: version(5), attach(5), ...),
- 9P2000.u (the Unix extension: numeric ids and errno on the wire, the
  ``extension`` string on create and stat),
- 9P2000.L (the Linux dialect of v9fs/diod/QEMU: Tlopen, Tgetattr, Treaddir ...,
  errors as Rlerror with a Linux errno).

Every message class has ``tag: int`` (u16) as its first field, then its body
fields in wire order, and two class attributes:

- ``TYPE``: the message type number (the type[1] byte of the header),
- ``WIRE``: the wire layout, a space separated list of ``name:kind`` where kind
  is ``u8``/``u16``/``u32``/``u64`` (an ``int``), ``s`` (``str``, UTF-8 with a
  u16 byte count), ``qid`` (:class:`~ninep.qid.Qid`, 13 bytes), ``qids``
  (``tuple[Qid, ...]``, u16 count), ``strs`` (``tuple[str, ...]``, u16 count),
  ``data`` (``bytes``, u32 count) or ``stat`` (:class:`Stat` preceded by an
  n[2] byte count, as in Rstat/Twstat).  A ``/u`` or ``/uL`` suffix marks a
  field that is on the wire only in 9P2000.u (``/u``) or in 9P2000.u and
  9P2000.L (``/uL``); in other dialects it is not sent and decodes as its
  default.

The codec does not restrict which messages a dialect may use: a 9P2000.L
message decodes under the 9P2000 dialect too (type numbers never collide), and
the server answers what it does not support with an error.
"""

from __future__ import annotations

import enum
import os
from dataclasses import fields
from typing import ClassVar

from .frozen import frozen
from .qid import Qid

__all__ = [
    "Dialect",
    "Message",
    "MESSAGE_TYPES",
    "Stat",
    "NOTAG",
    "NOFID",
    "NONUNAME",
    "HEADER_SIZE",
    "IOHDRSZ",
    "MIN_MSIZE",
    "MAXWELEM",
    "AT_REMOVEDIR",
    "dotl_flags_from_os",
    "dotl_flags_to_os",
]


class Dialect(str, enum.Enum):
    """The protocol version string agreed in Tversion/Rversion (version(5))."""

    P2000 = "9P2000"
    U = "9P2000.u"
    L = "9P2000.L"


NOTAG = 0xFFFF  #: the tag of Tversion (version(5))
NOFID = 0xFFFFFFFF  #: "no fid", e.g. afid of Tattach without auth (attach(5))
NONUNAME = 0xFFFFFFFF  #: "no numeric user id" in .u/.L n_uname and stat n_uid
HEADER_SIZE = 7  #: size[4] type[1] tag[2]
IOHDRSZ = 24  #: bytes of a Twrite/Rread header; iounit 0 means msize - IOHDRSZ
#: Smallest msize (bytes) either end accepts: the server in Tversion, the
#: client in Rversion.  It is Linux's bound: net/9p/client.c refuses an msize
#: below 4096 both as its own mount option (p9_client_create: "Please specify
#: a msize of at least 4k") and in a server's Rversion (p9_client_version:
#: "server returned a msize < 4096", EREMOTEIO), so nothing smaller can serve a
#: v9fs mount.  (diod's server itself only refuses msize < IOHDRSZ + 1, in
#: libnpfs/fcall.c np_version.)
MIN_MSIZE = 4096
MAXWELEM = 16  #: most names one Twalk may carry (walk(5)); the server enforces it

# Tsetattr valid bits (9P2000.L, Linux include/net/9p/9p.h).
P9_SETATTR_MODE = 0x00000001
P9_SETATTR_UID = 0x00000002
P9_SETATTR_GID = 0x00000004
P9_SETATTR_SIZE = 0x00000008
P9_SETATTR_ATIME = 0x00000010
P9_SETATTR_MTIME = 0x00000020
P9_SETATTR_CTIME = 0x00000040
P9_SETATTR_ATIME_SET = 0x00000080
P9_SETATTR_MTIME_SET = 0x00000100

# Tgetattr request_mask / Rgetattr valid bits (9P2000.L).
P9_GETATTR_BASIC = 0x000007FF
P9_GETATTR_ALL = 0x00003FFF

# 9P2000 Topen/Tcreate mode byte (open(5)).
OREAD = 0
OWRITE = 1
ORDWR = 2
OEXEC = 3
OTRUNC = 0x10
ORCLOSE = 0x40

# 9P2000 permission/mode bits of stat(5) (DMSYMLINK... are 9P2000.u).
DMDIR = 0x80000000
DMAPPEND = 0x40000000
DMEXCL = 0x20000000
DMSYMLINK = 0x02000000
DMDEVICE = 0x00800000
DMNAMEDPIPE = 0x00200000
DMSOCKET = 0x00100000
DMSETUID = 0x00080000
DMSETGID = 0x00040000

# Tlock/Tgetlock (9P2000.L).
P9_LOCK_TYPE_RDLCK = 0
P9_LOCK_TYPE_WRLCK = 1
P9_LOCK_TYPE_UNLCK = 2
P9_LOCK_SUCCESS = 0
P9_LOCK_BLOCKED = 1
P9_LOCK_ERROR = 2
P9_LOCK_GRACE = 3

#: Tunlinkat ``flags`` bit asking for rmdir(2) semantics (P9_DOTL_AT_REMOVEDIR
#: of Linux include/net/9p/9p.h, the value of Linux's unlinkat(2) AT_REMOVEDIR).
AT_REMOVEDIR = 0x200

# Tlopen/Tlcreate flags (9P2000.L, Linux include/net/9p/9p.h P9_DOTL_*).  The
# protocol fixes them on the wire as Linux's asm-generic open(2) values (those
# of x86); hosts whose O_* differ (arm/arm64: O_DIRECTORY, O_NOFOLLOW, O_DIRECT,
# O_LARGEFILE; alpha, sparc, parisc, mips: most bits) must translate, with
# dotl_flags_from_os() and dotl_flags_to_os().
P9_DOTL_RDONLY = 0o0
P9_DOTL_WRONLY = 0o1
P9_DOTL_RDWR = 0o2
P9_DOTL_NOACCESS = 0o3
P9_DOTL_CREATE = 0o100
P9_DOTL_EXCL = 0o200
P9_DOTL_NOCTTY = 0o400
P9_DOTL_TRUNC = 0o1000
P9_DOTL_APPEND = 0o2000
P9_DOTL_NONBLOCK = 0o4000
P9_DOTL_DSYNC = 0o10000
P9_DOTL_FASYNC = 0o20000
P9_DOTL_DIRECT = 0o40000
P9_DOTL_LARGEFILE = 0o100000
P9_DOTL_DIRECTORY = 0o200000
P9_DOTL_NOFOLLOW = 0o400000
P9_DOTL_NOATIME = 0o1000000
P9_DOTL_CLOEXEC = 0o2000000
P9_DOTL_SYNC = 0o4000000

_DOTL_ACCMODE = 0o3

#: Every P9_DOTL_* flag bit (the access mode aside) and the name of its
#: ``os.O_*`` counterpart (FASYNC is ``os.O_ASYNC``).
DOTL_OS_FLAG_NAMES: tuple[tuple[int, str], ...] = (
    (P9_DOTL_CREATE, "O_CREAT"),
    (P9_DOTL_EXCL, "O_EXCL"),
    (P9_DOTL_NOCTTY, "O_NOCTTY"),
    (P9_DOTL_TRUNC, "O_TRUNC"),
    (P9_DOTL_APPEND, "O_APPEND"),
    (P9_DOTL_NONBLOCK, "O_NONBLOCK"),
    (P9_DOTL_DSYNC, "O_DSYNC"),
    (P9_DOTL_FASYNC, "O_ASYNC"),
    (P9_DOTL_DIRECT, "O_DIRECT"),
    (P9_DOTL_LARGEFILE, "O_LARGEFILE"),
    (P9_DOTL_DIRECTORY, "O_DIRECTORY"),
    (P9_DOTL_NOFOLLOW, "O_NOFOLLOW"),
    (P9_DOTL_NOATIME, "O_NOATIME"),
    (P9_DOTL_CLOEXEC, "O_CLOEXEC"),
    (P9_DOTL_SYNC, "O_SYNC"),
)


def _dotl_os_pairs(host: object) -> tuple[tuple[int, int], ...]:
    """(P9_DOTL_* bit, O_* value) for the flags ``host`` (the os module) has.

    Flags the host lacks or defines as 0 (O_DIRECT and O_NOATIME off Linux,
    O_LARGEFILE on 64-bit glibc, where the kernel sets it itself) are left out.
    """
    return tuple((bit, v) for bit, name in DOTL_OS_FLAG_NAMES if (v := getattr(host, name, 0)))


_DOTL_OS_PAIRS = _dotl_os_pairs(os)
_ACC_FROM_OS = {os.O_RDONLY: P9_DOTL_RDONLY, os.O_WRONLY: P9_DOTL_WRONLY, os.O_RDWR: P9_DOTL_RDWR}
_ACC_TO_OS = {
    P9_DOTL_RDONLY: os.O_RDONLY,
    P9_DOTL_WRONLY: os.O_WRONLY,
    P9_DOTL_RDWR: os.O_RDWR,
    P9_DOTL_NOACCESS: os.O_RDONLY,
}


def dotl_flags_from_os(os_flags: int) -> int:
    """The 9P2000.L Tlopen/Tlcreate ``flags`` word (u32) for this host's open(2) flags.

    ``os_flags`` is an ``os.O_*`` combination.  The access mode O_RDONLY,
    O_WRONLY, O_RDWR becomes P9_DOTL_RDONLY, _WRONLY, _RDWR (any other value of
    the O_ACCMODE bits P9_DOTL_NOACCESS).  Every other flag with a P9_DOTL_*
    counterpart sets that bit when all of its own bits are present, so Linux's
    O_SYNC (which contains O_DSYNC) gives P9_DOTL_SYNC | P9_DOTL_DSYNC, as the
    x86 kernel sends it.  Bits without a counterpart (O_PATH, O_TMPFILE's own
    bit ...) are dropped.  O_CLOEXEC maps like the others; a client drops it
    first, since it means nothing to the server.  Never raises.

    Source: 9P2000.L protocol, Linux include/net/9p/9p.h (and
    v9fs_open_to_dotl_flags() in fs/9p/vfs_inode_dotl.c).
    """
    out = _ACC_FROM_OS.get(os_flags & os.O_ACCMODE, P9_DOTL_NOACCESS)
    for bit, oflag in _DOTL_OS_PAIRS:
        if os_flags & oflag == oflag:
            out |= bit
    return out


def dotl_flags_to_os(wire_flags: int) -> int:
    """This host's open(2) flags for a 9P2000.L Tlopen/Tlcreate ``flags`` word.

    ``wire_flags`` is the u32 from the wire.  The access mode P9_DOTL_RDONLY,
    _WRONLY, _RDWR becomes O_RDONLY, O_WRONLY, O_RDWR; P9_DOTL_NOACCESS opens
    read-only.  Every other P9_DOTL_* bit becomes its ``os.O_*`` value when the
    host has one (see :data:`DOTL_OS_FLAG_NAMES`); unknown bits and flags the
    host lacks are masked.  Never raises.

    Source: 9P2000.L protocol, Linux include/net/9p/9p.h (and QEMU's
    dotl_to_open_flags() in hw/9pfs/9p.c).
    """
    out = _ACC_TO_OS[wire_flags & _DOTL_ACCMODE]
    for bit, oflag in _DOTL_OS_PAIRS:
        if wire_flags & bit:
            out |= oflag
    return out


@frozen
class Stat:
    """A stat(5) directory entry: what Rstat returns and 9P2000 directory reads hold.

    ``type`` u16 and ``dev`` u32 are for kernel use (0); ``qid`` the file's
    :class:`Qid`; ``mode`` u32 permission bits plus DM* bits; ``atime``,
    ``mtime`` u32 seconds since the epoch; ``length`` u64 bytes; ``name``,
    ``uid``, ``gid``, ``muid`` strings.  ``extension`` (symlink target or
    device spec), ``n_uid``, ``n_gid``, ``n_muid`` (numeric ids, NONUNAME for
    none) are on the wire only in 9P2000.u.  In Twstat all-ones integers and
    empty strings mean "don't change" (stat(5)).
    """

    type: int
    dev: int
    qid: Qid
    mode: int
    atime: int
    mtime: int
    length: int
    name: str
    uid: str
    gid: str
    muid: str
    extension: str = ""
    n_uid: int = NONUNAME
    n_gid: int = NONUNAME
    n_muid: int = NONUNAME


class Message:
    """Base class of every 9P message dataclass.

    Subclasses are ``@frozen`` dataclasses (ninep.frozen) with ``tag`` first;
    ``TYPE`` is the wire type number and ``WIRE`` the field layout described in
    the module docstring.
    """

    __slots__ = ()
    TYPE: ClassVar[int]
    WIRE: ClassVar[str]


_msg = frozen

# --------------------------------------------------------------------------
# 9P2000 (intro(5)); shared by all dialects.
# --------------------------------------------------------------------------


@_msg
class Tversion(Message):
    """version(5): propose ``msize`` (bytes) and a protocol ``version`` string; tag NOTAG."""

    TYPE = 100
    WIRE = "msize:u32 version:s"
    tag: int
    msize: int
    version: str


@_msg
class Rversion(Message):
    """version(5): the agreed ``msize`` (<= the client's) and version, or "unknown"."""

    TYPE = 101
    WIRE = "msize:u32 version:s"
    tag: int
    msize: int
    version: str


@_msg
class Tauth(Message):
    """attach(5): open an auth file as ``afid``; ``n_uname`` (.u/.L) is the numeric uid."""

    TYPE = 102
    WIRE = "afid:u32 uname:s aname:s n_uname:u32/uL"
    tag: int
    afid: int
    uname: str
    aname: str
    n_uname: int = NONUNAME


@_msg
class Rauth(Message):
    """attach(5): the qid of the auth file."""

    TYPE = 103
    WIRE = "aqid:qid"
    tag: int
    aqid: Qid


@_msg
class Tattach(Message):
    """attach(5): make ``fid`` the root of tree ``aname`` for user ``uname``."""

    TYPE = 104
    WIRE = "fid:u32 afid:u32 uname:s aname:s n_uname:u32/uL"
    tag: int
    fid: int
    afid: int
    uname: str
    aname: str
    n_uname: int = NONUNAME


@_msg
class Rattach(Message):
    """attach(5): the root's qid."""

    TYPE = 105
    WIRE = "qid:qid"
    tag: int
    qid: Qid


@_msg
class Rerror(Message):
    """error(5): the request failed with message ``ename``; ``errno`` only on the wire in .u."""

    TYPE = 107
    WIRE = "ename:s errno:u32/u"
    tag: int
    ename: str
    errno: int = 0


@_msg
class Tflush(Message):
    """flush(5): abort the request with tag ``oldtag``; always answered with Rflush."""

    TYPE = 108
    WIRE = "oldtag:u16"
    tag: int
    oldtag: int


@_msg
class Rflush(Message):
    """flush(5): no reply for ``oldtag`` follows."""

    TYPE = 109
    WIRE = ""
    tag: int


@_msg
class Twalk(Message):
    """walk(5): walk ``fid`` through ``wnames`` (at most MAXWELEM) giving ``newfid``."""

    TYPE = 110
    WIRE = "fid:u32 newfid:u32 wnames:strs"
    tag: int
    fid: int
    newfid: int
    wnames: tuple[str, ...]


@_msg
class Rwalk(Message):
    """walk(5): the qids of the names walked; fewer than asked means a partial walk."""

    TYPE = 111
    WIRE = "wqids:qids"
    tag: int
    wqids: tuple[Qid, ...]


@_msg
class Topen(Message):
    """open(5): open ``fid`` with mode byte ``mode`` (OREAD... | OTRUNC | ORCLOSE)."""

    TYPE = 112
    WIRE = "fid:u32 mode:u8"
    tag: int
    fid: int
    mode: int


@_msg
class Ropen(Message):
    """open(5): the file's qid and ``iounit`` (0: msize - IOHDRSZ)."""

    TYPE = 113
    WIRE = "qid:qid iounit:u32"
    tag: int
    qid: Qid
    iounit: int


@_msg
class Tcreate(Message):
    """open(5): create ``name`` in directory ``fid`` with ``perm`` (DM* bits) and open it.

    ``extension`` (.u only) is the symlink target or device spec.
    """

    TYPE = 114
    WIRE = "fid:u32 name:s perm:u32 mode:u8 extension:s/u"
    tag: int
    fid: int
    name: str
    perm: int
    mode: int
    extension: str = ""


@_msg
class Rcreate(Message):
    """open(5): the new file's qid and iounit."""

    TYPE = 115
    WIRE = "qid:qid iounit:u32"
    tag: int
    qid: Qid
    iounit: int


@_msg
class Tread(Message):
    """read(5): read up to ``count`` bytes at byte ``offset``."""

    TYPE = 116
    WIRE = "fid:u32 offset:u64 count:u32"
    tag: int
    fid: int
    offset: int
    count: int


@_msg
class Rread(Message):
    """read(5): the bytes read (empty at end of file)."""

    TYPE = 117
    WIRE = "data:data"
    tag: int
    data: bytes


@_msg
class Twrite(Message):
    """read(5): write ``data`` at byte ``offset``."""

    TYPE = 118
    WIRE = "fid:u32 offset:u64 data:data"
    tag: int
    fid: int
    offset: int
    data: bytes


@_msg
class Rwrite(Message):
    """read(5): how many bytes were written."""

    TYPE = 119
    WIRE = "count:u32"
    tag: int
    count: int


@_msg
class Tclunk(Message):
    """clunk(5): forget ``fid``."""

    TYPE = 120
    WIRE = "fid:u32"
    tag: int
    fid: int


@_msg
class Rclunk(Message):
    """clunk(5)."""

    TYPE = 121
    WIRE = ""
    tag: int


@_msg
class Tremove(Message):
    """remove(5): remove the file of ``fid`` and clunk it."""

    TYPE = 122
    WIRE = "fid:u32"
    tag: int
    fid: int


@_msg
class Rremove(Message):
    """remove(5)."""

    TYPE = 123
    WIRE = ""
    tag: int


@_msg
class Tstat(Message):
    """stat(5): ask for the stat of ``fid``."""

    TYPE = 124
    WIRE = "fid:u32"
    tag: int
    fid: int


@_msg
class Rstat(Message):
    """stat(5): the :class:`Stat` (on the wire n[2] then the stat with its size[2])."""

    TYPE = 125
    WIRE = "stat:stat"
    tag: int
    stat: Stat


@_msg
class Twstat(Message):
    """stat(5): change the stat of ``fid`` (all-ones/empty fields: don't change)."""

    TYPE = 126
    WIRE = "fid:u32 stat:stat"
    tag: int
    fid: int
    stat: Stat


@_msg
class Rwstat(Message):
    """stat(5)."""

    TYPE = 127
    WIRE = ""
    tag: int


# --------------------------------------------------------------------------
# 9P2000.L (Linux include/net/9p/9p.h, diod protocol.md).
# --------------------------------------------------------------------------


@_msg
class Rlerror(Message):
    """9P2000.L error reply: a positive Linux errno ``ecode``."""

    TYPE = 7
    WIRE = "ecode:u32"
    tag: int
    ecode: int


@_msg
class Tstatfs(Message):
    """9P2000.L statfs(2) of the filesystem holding ``fid``."""

    TYPE = 8
    WIRE = "fid:u32"
    tag: int
    fid: int


@_msg
class Rstatfs(Message):
    """9P2000.L: struct statfs fields (block counts in units of ``bsize`` bytes)."""

    TYPE = 9
    WIRE = (
        "type:u32 bsize:u32 blocks:u64 bfree:u64 bavail:u64 files:u64 ffree:u64 "
        "fsid:u64 namelen:u32"
    )
    tag: int
    type: int
    bsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    fsid: int
    namelen: int


@_msg
class Tlopen(Message):
    """9P2000.L open(2) of ``fid``; ``flags`` are P9_DOTL_* bits (:func:`dotl_flags_to_os`)."""

    TYPE = 12
    WIRE = "fid:u32 flags:u32"
    tag: int
    fid: int
    flags: int


@_msg
class Rlopen(Message):
    """9P2000.L: the opened file's qid and iounit."""

    TYPE = 13
    WIRE = "qid:qid iounit:u32"
    tag: int
    qid: Qid
    iounit: int


@_msg
class Tlcreate(Message):
    """9P2000.L: create and open ``name`` in directory ``fid`` (``fid`` becomes the
    file); ``flags`` are P9_DOTL_* bits, ``mode`` the st_mode bits."""

    TYPE = 14
    WIRE = "fid:u32 name:s flags:u32 mode:u32 gid:u32"
    tag: int
    fid: int
    name: str
    flags: int
    mode: int
    gid: int


@_msg
class Rlcreate(Message):
    """9P2000.L: the new file's qid and iounit."""

    TYPE = 15
    WIRE = "qid:qid iounit:u32"
    tag: int
    qid: Qid
    iounit: int


@_msg
class Tsymlink(Message):
    """9P2000.L: make symlink ``name`` -> ``symtgt`` in directory ``fid``."""

    TYPE = 16
    WIRE = "fid:u32 name:s symtgt:s gid:u32"
    tag: int
    fid: int
    name: str
    symtgt: str
    gid: int


@_msg
class Rsymlink(Message):
    """9P2000.L: the symlink's qid."""

    TYPE = 17
    WIRE = "qid:qid"
    tag: int
    qid: Qid


@_msg
class Tmknod(Message):
    """9P2000.L mknod(2) of ``name`` in directory ``dfid``."""

    TYPE = 18
    WIRE = "dfid:u32 name:s mode:u32 major:u32 minor:u32 gid:u32"
    tag: int
    dfid: int
    name: str
    mode: int
    major: int
    minor: int
    gid: int


@_msg
class Rmknod(Message):
    """9P2000.L: the new node's qid."""

    TYPE = 19
    WIRE = "qid:qid"
    tag: int
    qid: Qid


@_msg
class Trename(Message):
    """9P2000.L: move ``fid`` to ``name`` in directory ``dfid``."""

    TYPE = 20
    WIRE = "fid:u32 dfid:u32 name:s"
    tag: int
    fid: int
    dfid: int
    name: str


@_msg
class Rrename(Message):
    """9P2000.L."""

    TYPE = 21
    WIRE = ""
    tag: int


@_msg
class Treadlink(Message):
    """9P2000.L readlink(2) of ``fid``."""

    TYPE = 22
    WIRE = "fid:u32"
    tag: int
    fid: int


@_msg
class Rreadlink(Message):
    """9P2000.L: the symlink's target."""

    TYPE = 23
    WIRE = "target:s"
    tag: int
    target: str


@_msg
class Tgetattr(Message):
    """9P2000.L: ask for the attributes in ``request_mask`` (P9_GETATTR_* bits) of ``fid``."""

    TYPE = 24
    WIRE = "fid:u32 request_mask:u64"
    tag: int
    fid: int
    request_mask: int


@_msg
class Rgetattr(Message):
    """9P2000.L: struct stat; ``valid`` says which fields are filled; times are sec + nsec."""

    TYPE = 25
    WIRE = (
        "valid:u64 qid:qid mode:u32 uid:u32 gid:u32 nlink:u64 rdev:u64 size:u64 "
        "blksize:u64 blocks:u64 atime_sec:u64 atime_nsec:u64 mtime_sec:u64 "
        "mtime_nsec:u64 ctime_sec:u64 ctime_nsec:u64 btime_sec:u64 btime_nsec:u64 "
        "gen:u64 data_version:u64"
    )
    tag: int
    valid: int
    qid: Qid
    mode: int
    uid: int
    gid: int
    nlink: int
    rdev: int
    size: int
    blksize: int
    blocks: int
    atime_sec: int
    atime_nsec: int
    mtime_sec: int
    mtime_nsec: int
    ctime_sec: int
    ctime_nsec: int
    btime_sec: int
    btime_nsec: int
    gen: int
    data_version: int


@_msg
class Tsetattr(Message):
    """9P2000.L: change the attributes of ``fid`` named by ``valid`` (P9_SETATTR_* bits)."""

    TYPE = 26
    WIRE = (
        "fid:u32 valid:u32 mode:u32 uid:u32 gid:u32 size:u64 atime_sec:u64 "
        "atime_nsec:u64 mtime_sec:u64 mtime_nsec:u64"
    )
    tag: int
    fid: int
    valid: int
    mode: int
    uid: int
    gid: int
    size: int
    atime_sec: int
    atime_nsec: int
    mtime_sec: int
    mtime_nsec: int


@_msg
class Rsetattr(Message):
    """9P2000.L."""

    TYPE = 27
    WIRE = ""
    tag: int


@_msg
class Txattrwalk(Message):
    """9P2000.L: open xattr ``name`` of ``fid`` (empty: the list) as ``newfid``."""

    TYPE = 30
    WIRE = "fid:u32 newfid:u32 name:s"
    tag: int
    fid: int
    newfid: int
    name: str


@_msg
class Rxattrwalk(Message):
    """9P2000.L: the xattr value's size in bytes."""

    TYPE = 31
    WIRE = "size:u64"
    tag: int
    size: int


@_msg
class Txattrcreate(Message):
    """9P2000.L: prepare ``fid`` to write xattr ``name`` of ``attr_size`` bytes."""

    TYPE = 32
    WIRE = "fid:u32 name:s attr_size:u64 flags:u32"
    tag: int
    fid: int
    name: str
    attr_size: int
    flags: int


@_msg
class Rxattrcreate(Message):
    """9P2000.L."""

    TYPE = 33
    WIRE = ""
    tag: int


@_msg
class Treaddir(Message):
    """9P2000.L: read directory entries from cookie ``offset``, at most ``count`` bytes."""

    TYPE = 40
    WIRE = "fid:u32 offset:u64 count:u32"
    tag: int
    fid: int
    offset: int
    count: int


@_msg
class Rreaddir(Message):
    """9P2000.L: packed entries (see :func:`ninep.codec.pack_dirent`); empty at the end."""

    TYPE = 41
    WIRE = "data:data"
    tag: int
    data: bytes


@_msg
class Tfsync(Message):
    """9P2000.L fsync(2) (``datasync`` non-zero: fdatasync) of ``fid``."""

    TYPE = 50
    WIRE = "fid:u32 datasync:u32"
    tag: int
    fid: int
    datasync: int


@_msg
class Rfsync(Message):
    """9P2000.L."""

    TYPE = 51
    WIRE = ""
    tag: int


@_msg
class Tlock(Message):
    """9P2000.L POSIX record lock (P9_LOCK_TYPE_*) on ``fid``."""

    TYPE = 52
    WIRE = "fid:u32 type:u8 flags:u32 start:u64 length:u64 proc_id:u32 client_id:s"
    tag: int
    fid: int
    type: int
    flags: int
    start: int
    length: int
    proc_id: int
    client_id: str


@_msg
class Rlock(Message):
    """9P2000.L: P9_LOCK_SUCCESS / BLOCKED / ERROR / GRACE."""

    TYPE = 53
    WIRE = "status:u8"
    tag: int
    status: int


@_msg
class Tgetlock(Message):
    """9P2000.L: test whether the described lock could be placed (F_GETLK)."""

    TYPE = 54
    WIRE = "fid:u32 type:u8 start:u64 length:u64 proc_id:u32 client_id:s"
    tag: int
    fid: int
    type: int
    start: int
    length: int
    proc_id: int
    client_id: str


@_msg
class Rgetlock(Message):
    """9P2000.L: the conflicting lock, or ``type`` P9_LOCK_TYPE_UNLCK if none."""

    TYPE = 55
    WIRE = "type:u8 start:u64 length:u64 proc_id:u32 client_id:s"
    tag: int
    type: int
    start: int
    length: int
    proc_id: int
    client_id: str


@_msg
class Tlink(Message):
    """9P2000.L: hard link ``fid`` as ``name`` in directory ``dfid``."""

    TYPE = 70
    WIRE = "dfid:u32 fid:u32 name:s"
    tag: int
    dfid: int
    fid: int
    name: str


@_msg
class Rlink(Message):
    """9P2000.L."""

    TYPE = 71
    WIRE = ""
    tag: int


@_msg
class Tmkdir(Message):
    """9P2000.L mkdir(2) of ``name`` in directory ``dfid``."""

    TYPE = 72
    WIRE = "dfid:u32 name:s mode:u32 gid:u32"
    tag: int
    dfid: int
    name: str
    mode: int
    gid: int


@_msg
class Rmkdir(Message):
    """9P2000.L: the new directory's qid."""

    TYPE = 73
    WIRE = "qid:qid"
    tag: int
    qid: Qid


@_msg
class Trenameat(Message):
    """9P2000.L renameat(2)."""

    TYPE = 74
    WIRE = "olddirfid:u32 oldname:s newdirfid:u32 newname:s"
    tag: int
    olddirfid: int
    oldname: str
    newdirfid: int
    newname: str


@_msg
class Rrenameat(Message):
    """9P2000.L."""

    TYPE = 75
    WIRE = ""
    tag: int


@_msg
class Tunlinkat(Message):
    """9P2000.L unlinkat(2) (``flags`` may hold :data:`AT_REMOVEDIR`)."""

    TYPE = 76
    WIRE = "dirfid:u32 name:s flags:u32"
    tag: int
    dirfid: int
    name: str
    flags: int


@_msg
class Runlinkat(Message):
    """9P2000.L."""

    TYPE = 77
    WIRE = ""
    tag: int


def _registry() -> dict[int, type[Message]]:
    table: dict[int, type[Message]] = {}
    for cls in Message.__subclasses__():
        # dataclass(slots=True) replaces each class; skip the discarded originals.
        if globals().get(cls.__name__) is not cls:
            continue
        if cls.TYPE in table:
            raise AssertionError(f"duplicate 9P type {cls.TYPE}: {cls.__name__}")
        names = [f.name for f in fields(cls)]
        wire = [item.split(":", 1)[0] for item in cls.WIRE.split()]
        if names != ["tag", *wire]:
            raise AssertionError(f"{cls.__name__}: fields {names} != tag + WIRE {wire}")
        table[cls.TYPE] = cls
    return dict(sorted(table.items()))


#: Every message class by its wire type number.
MESSAGE_TYPES: dict[int, type[Message]] = _registry()

__all__ += [cls.__name__ for cls in MESSAGE_TYPES.values()]
__all__ += [n for n in list(globals()) if n.startswith(("P9_", "DM", "O")) and n.isupper()]
