"""The qid: the server's unique identity of a file (intro(5)).

A qid is 13 bytes on the wire: type[1] version[4] path[8].  ``path`` is unique
among all files of a server and stable for a file's life (Linux uses it as the
inode number); ``version`` changes when the file changes (0 on synthetic files:
it keeps Linux's v9fs from caching pages); ``type`` holds the QT* bits, the high
byte of the file's 9P mode.
"""

from __future__ import annotations

from .frozen import frozen

QTDIR = 0x80
QTAPPEND = 0x40
QTEXCL = 0x20
QTMOUNT = 0x10
QTAUTH = 0x08
QTTMP = 0x04
QTSYMLINK = 0x02
QTLINK = 0x01
QTFILE = 0x00


@frozen
class Qid:
    """``Qid(type, version, path)``: QT* bits (u8), version (u32), path (u64)."""

    type: int
    version: int
    path: int

    @property
    def is_dir(self) -> bool:
        return bool(self.type & QTDIR)
