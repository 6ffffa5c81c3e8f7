"""The cloudfs tree written down as data: path patterns → kind, mode, doc.

This table is the contract that docs/namespace.md mirrors (a test checks
that every pattern here appears in the doc).  Like 9front's webfs(4), each
file has one kind; the node classes in :mod:`cloudfs.nodes` take their mode
from here, and qids are derived from (kind, pid, key):

    qid.path = kind << 56 | (pid & 0xFFFFFF) << 32 | crc32(key)

so a path is unique and stable for the life of the file (``key`` is the env
key, image or network name; empty otherwise), qid.version is 0, size 0.
"""

from __future__ import annotations

import hashlib
import stat
import zlib
from dataclasses import dataclass

from ninep.fs import qid_type_for_mode
from ninep.qid import Qid

(ROOT, PROC, PID, CTL, STATUS, CHILDREN, USERDATA, ENV, ENVKEY, WAIT, IMAGES, IMAGE, NET, NETFILE, LIMITS, STATS,
 CONSOLE, NOTE, NOTEPG, PIPEDIR, PIPE, FILES, FILEDIR, FILE, HOSTS, HOST) = range(1, 27)

DIR = stat.S_IFDIR
REG = stat.S_IFREG


@dataclass(frozen=True)
class Entry:
    """One row: ``pattern`` (``<pid>``, ``<key>``, ``<name>`` are variables),
    ``kind`` (a small int, also the top byte of qid.path), full ``mode``."""

    pattern: str
    kind: int
    mode: int
    doc: str


TREE: tuple[Entry, ...] = (
    Entry("/", ROOT, DIR | 0o555, "the root: proc, images, net, hosts, files"),
    Entry("/proc", PROC, DIR | 0o555, "one directory per live process, named by pid; 'self' walks to the attached process"),
    Entry("/proc/<pid>", PID, DIR | 0o555,
          "a process: ctl status children userdata env wait limits stats console note notepg pipe"),
    Entry("/proc/<pid>/ctl", CTL, REG | 0o660,
          "write one command (fork [name=N] | exec <image> [flavor=F] [net=NET] [name=N] | kill | stop | start); "
          "read back its result once (fork: the new pid), then EOF"),
    Entry("/proc/<pid>/status", STATUS, REG | 0o444,
          "key value lines: pid ppid name state desired image flavor networks host addresses created [error]"),
    Entry("/proc/<pid>/children", CHILDREN, REG | 0o444, "child pids, one per line, ascending"),
    Entry("/proc/<pid>/userdata", USERDATA, REG | 0o660, "the user-data; write replaces (at most 65536 bytes, else EFBIG)"),
    Entry("/proc/<pid>/env", ENV, DIR | 0o777, "the key/value space; ls lists set keys, rm unsets"),
    Entry("/proc/<pid>/env/<key>", ENVKEY, REG | 0o666,
          "write sets; read blocks until set (O_NONBLOCK: EAGAIN); every name can be looked up"),
    Entry("/proc/<pid>/wait", WAIT, REG | 0o444,
          "each read blocks until a child ended, returns '<pid> <name> <state> <message>' and consumes it"),
    Entry("/proc/<pid>/limits", LIMITS, REG | 0o660,
          "'name limit used' lines (descendants env-keys env-bytes notes pipes pipe-bytes files file-bytes); "
          "write 'name value' "
          "to set one "
          "(a process may only lower)"),
    Entry("/proc/<pid>/stats", STATS, REG | 0o444,
          "key value lines: cpu_ns memory_bytes memory_used_bytes block_* net_* uptime_s ('-' where unknown)"),
    Entry("/proc/<pid>/console", CONSOLE, REG | 0o440,
          "the VM's console output (the last 1 MiB); size is its length, so tail -f follows it"),
    Entry("/proc/<pid>/note", NOTE, REG | 0o660,
          "write posts one note (a line of at most 127 bytes); a read by the process itself blocks until a note "
          "is pending and takes the oldest (O_NONBLOCK: EAGAIN)"),
    Entry("/proc/<pid>/notepg", NOTEPG, REG | 0o220, "write posts the note to the process and every descendant"),
    Entry("/proc/<pid>/pipe", PIPEDIR, DIR | 0o775, "the process's pipes; creating a file makes a pipe, rm removes it"),
    Entry("/proc/<pid>/pipe/<name>", PIPE, REG | 0o660,
          "each write is one message (at most 64 KiB); each read takes one, blocking; EOF once every writer "
          "closed; EPIPE once the reader closed"),
    Entry("/images", IMAGES, DIR | 0o555, "one file per image of the compute driver"),
    Entry("/images/<name>", IMAGE, REG | 0o444, "key value lines: id name status size disk_format checksum created"),
    Entry("/net", NET, DIR | 0o775,
          "one file per network; creating a file /net/<name> creates the network, rm deletes it (EBUSY while used)"),
    Entry("/net/<name>", NETFILE, REG | 0o444, "key value lines: id name cidr status"),
    Entry("/hosts", HOSTS, DIR | 0o555, "one file per live daemon of the deployment, named by its host"),
    Entry("/hosts/<name>", HOST, REG | 0o444,
          "key value lines: name daemon driver scope since processes (the pids whose VMs it runs)"),
    Entry("/files", FILES, DIR | 0o777,
          "the deployment's shared file tree (cloudfs up --files: local directory or Swift); ordinary files "
          "and directories with true sizes and mtimes"),
    Entry("/files/…/<dir>", FILEDIR, DIR | 0o777,
          "a directory: mkdir, rmdir (ENOTEMPTY), mv; a process changes only what it or its descendants made"),
    Entry("/files/…/<file>", FILE, REG | 0o666,
          "a file: read and write at any offset, truncate, rm, mv; charged to its maker's files and "
          "file-bytes quotas and the deployment's (EDQUOT beyond)"),
)

BY_KIND: dict[int, Entry] = {e.kind: e for e in TREE}

#: The files of a process directory, in listing order.
PID_FILES: tuple[tuple[str, int], ...] = (
    ("ctl", CTL), ("status", STATUS), ("children", CHILDREN),
    ("userdata", USERDATA), ("env", ENV), ("wait", WAIT), ("limits", LIMITS), ("stats", STATS),
    ("console", CONSOLE), ("note", NOTE), ("notepg", NOTEPG), ("pipe", PIPEDIR),
)
#: The root's directories, in listing order.
ROOT_DIRS: tuple[tuple[str, int], ...] = (("proc", PROC), ("images", IMAGES), ("net", NET), ("hosts", HOSTS),
                                          ("files", FILES))


def mode_of(kind: int) -> int:
    """The full st_mode of files of ``kind``."""
    return BY_KIND[kind].mode


def file_qid(is_dir: bool, path: str, mtime_ns: int) -> Qid:
    """The qid of the /files entry at ``path`` (below /files): its kind in
    the top byte, 56 bits of a BLAKE2 hash of the path below it (unique in
    practice, stable across reads), the low 32 bits of the mtime as version
    (so Linux's caches notice a change)."""
    h = int.from_bytes(hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=7).digest(), "big")
    kind = FILEDIR if is_dir else FILE
    return Qid(qid_type_for_mode(mode_of(kind)), mtime_ns & 0xFFFFFFFF, (kind << 56) | h)


def qid_of(kind: int, pid: int = 0, key: str = "") -> Qid:
    """The qid of the file of ``kind`` for ``pid`` and ``key`` (see module doc)."""
    h = zlib.crc32(key.encode()) if key else 0
    path = (kind << 56) | ((pid & 0xFFFFFF) << 32) | h
    return Qid(qid_type_for_mode(mode_of(kind)), 0, path)
