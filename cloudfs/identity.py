"""Per-process identity: the credential a VM presents when it attaches over 9P.

Each process (except init) gets a random secret at fork, and a new one
when a rebuild (``exec`` of a VM) succeeds
(:func:`new_secret`), kept in its ZooKeeper record (field ``secret`` of
:class:`cloudfs.process.Process`, never shown in any file of the tree and
never put in user-data).  A driver whose guests reach the daemon over the
network hands it to the guest at boot (OpenStack: server metadata
``cloudfs-secret``, read from the metadata service, docs/openstack.md);
QEMU guests get none, their channel is their identity (cloudfs.channel).
Over TCP the guest attaches with

    aname = "proc/<pid>/<secret>"

(the Linux v9fs client sends its ``aname=`` mount option with every Tattach,
also the per-uid re-attaches of ``access=client``, so the credential always
travels), or equivalently ``aname = "proc/<pid>"`` with ``uname = "<secret>"``
for clients that attach once.

Two :class:`ninep.fs.FileSystem` faces of one :class:`cloudfs.namespace.CloudFS`:

- the CloudFS itself is the **operator** face (FUSE mount, the operator's unix
  socket ``STATE/cloudfs.sock``, mode 0600: file permissions are its
  credential).  aname ``""`` is the full-rights view; ``proc/<pid>`` the view
  of <pid> with that process's rights (no secret needed: the operator may act
  as any process).
- :class:`PublicFS` (``fs.public()``) is the face for the TCP listener that
  guests and everyone else reach.  aname ``""``/``"/"`` gives a **read-only**
  view (status, children, env, images, networks; no userdata, no wait, no
  writes at all: EACCES).  ``proc/<pid>/<secret>`` gives the process view;
  a wrong or missing secret, an unknown pid, or any other aname is refused
  with EACCES (no hint whether the pid exists).

What each view may do is enforced by :class:`cloudfs.nodes.View` (see
docs/namespace.md, *Views and permissions*).
"""

from __future__ import annotations

import errno
import hmac
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ninep.errors import FsError
from ninep.fs import FileSystem, Node

from .znodes import parse_pid

if TYPE_CHECKING:
    from .namespace import CloudFS

#: Bytes of randomness in a secret (hex-encoded: twice as many characters).
SECRET_BYTES = 16


def new_secret() -> str:
    """A fresh secret: 32 lowercase hex digits from :mod:`secrets` (128 bits)."""
    return secrets.token_hex(SECRET_BYTES)


@dataclass(frozen=True)
class Credential:
    """What an attach claims: ``pid`` and ``secret`` (None when not given)."""

    pid: int
    secret: str | None


def parse_attach(uname: str, aname: str) -> Credential | None:
    """The credential in an attach, or None for an anonymous attach (aname
    ``""`` or ``"/"``).  Accepted forms: aname ``proc/<pid>/<secret>``, or aname
    ``proc/<pid>`` with the secret as ``uname``.  Raises FsError(EACCES) for
    any other aname."""
    name = aname.strip("/")
    if name == "":
        return None
    parts = name.split("/")
    pid = parse_pid(parts[1]) if len(parts) in (2, 3) and parts[0] == "proc" else None
    if pid is not None:
        secret = parts[2] if len(parts) == 3 else (uname or None)
        return Credential(pid, secret)
    # the aname is not echoed: it may carry a credential (and 9P traces log replies)
    raise FsError(errno.EACCES, "unknown aname: use '' (read-only) or 'proc/<pid>/<secret>'")


def secret_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison; an empty ``expected`` (no secret on record)
    never matches."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode("utf-8", "surrogateescape"), given.encode("utf-8", "surrogateescape"))


class PublicFS(FileSystem):
    """The face of ``cfs`` served where anyone on the host (and every guest)
    can connect: the daemon's TCP listener.  Attach rules in the module
    docstring; errors: FsError(EACCES) for a refused credential, EIO/EAGAIN
    when ZooKeeper is unavailable."""

    def __init__(self, cfs: "CloudFS"):
        self.cfs = cfs

    async def attach(self, uname: str, aname: str, n_uname: int | None = None) -> Node:
        cred = parse_attach(uname, aname)
        if cred is None:
            return self.cfs.readonly_view()
        rec = await self.cfs.records.cached(cred.pid)
        if rec is None or not secret_matches(rec.secret, cred.secret):
            raise FsError(errno.EACCES, f"bad credential for process {cred.pid}")
        return self.cfs.view_for(cred.pid)

    async def close(self) -> None:
        """Nothing of its own: the CloudFS is closed by its owner."""
