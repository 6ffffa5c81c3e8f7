"""A deployment's ZooKeeper tree and its unique id.

The first daemon on an empty root creates the tree (:mod:`cloudfs.znodes`)
in one multi, with init (pid 1) and the deployment id: 32 hex digits from
:func:`uuid.uuid4`, kept in ``<root>/id``.  Every daemon reads it at start
(and logs it); the compute driver stamps it on every server it makes and
only ever acts on servers that carry it.  So two deployments that share a
name (``cloudfs up`` twice with fresh embedded ZooKeepers, both
``/cloudfs/default``) on one cloud never adopt or delete each other's
servers.

A tree made before ids existed has servers tagged with its root path (what
``cloudfs-deployment`` held then): on its first start it gets its root path
as its id, so it keeps its servers (and the old weakness: another tree of
the same name made that way shares them).
"""

from __future__ import annotations

import errno
import logging
import re
import uuid
from collections.abc import Mapping

from ninep.errors import FsError

from .process import init_record
from .quotas import DEFAULT_LIMITS, DEFAULT_MAX_PROCESSES, DESCENDANTS, NAMES, Quota
from .store import NodeExistsError, NoNodeError, Store

log = logging.getLogger(__name__)
from .znodes import INIT_PID, Layout

_ID = re.compile(r"^[0-9a-f]{32}$")


def new_deployment_id() -> str:
    """A fresh deployment id: 32 lowercase hex digits (uuid4, 122 random bits)."""
    return uuid.uuid4().hex


async def open_deployment(store: Store, layout: Layout, max_processes: int = DEFAULT_MAX_PROCESSES,
                          limits: Mapping[str, int] = DEFAULT_LIMITS, adopt_open: bool = False) -> str:
    """Create the deployment's znodes, init (pid 1, whose quota allows
    ``max_processes`` descendants and the env ``limits``) and its id if
    missing (atomic, so concurrent daemons agree; nothing changes when they
    exist), and return the id.  FsError(EIO) if ``<root>/id`` holds
    anything but an id; the store's EAGAIN/EIO for connection trouble.

    With a credential (the store's ACL), a tree that exists without it
    (made before ACLs, or by anyone who can reach ZooKeeper: the shared
    parent is open) is refused with EACCES unless ``adopt_open``: its
    records could be planted.  Adopted, every znode of it gets the ACL."""
    L = layout
    if await store.is_secured(L.root) is False and not adopt_open:
        raise FsError(errno.EACCES, f"{L.root} exists without the deployment's ACL (made before ACLs, or by "
                                    "someone else): check it, then start once with --adopt-open-tree")
    init_quota = Quota({**{n: limits.get(n, DEFAULT_LIMITS[n]) for n in NAMES}, DESCENDANTS: max_processes})
    if await store.exists(L.nextpid) is None:
        await store.ensure_path(L.parent, open_acl=True)  # shared by deployments: listing it tells only names
        await store.ensure_path(L.root)
        t = store.transaction()
        t.create(L.id, new_deployment_id().encode())
        t.create(L.nextpid, b"2")
        t.create(L.proc, b"")
        t.create(L.pending, b"")
        t.create(L.owners, b"")
        t.create(L.hosts, b"")
        t.create(L.moves, b"")
        init = L.process_subtree(INIT_PID)
        t.create(init[0], init_record().to_json())
        for p in init[1:]:
            t.create(p, b"")
        t.create(L.quota(INIT_PID), init_quota.to_json())
        try:
            await store.commit(t)
        except NodeExistsError:
            pass  # another daemon made it first
    if await store.exists(L.quota(INIT_PID)) is None:  # a tree from before quotas: count what is there
        live = layout.pids(await store.children(L.proc))
        try:
            await store.create(L.quota(INIT_PID), init_quota.using(descendants=max(0, len(live) - 1)).to_json())
        except (NodeExistsError, NoNodeError):
            pass
    for older in (L.hosts, L.moves):  # a tree from before /hosts or migrate
        if await store.exists(older) is None:
            try:
                await store.create(older, b"")
            except NodeExistsError:
                pass
    got = await store.get(L.id)
    if got is None:  # a tree from before deployment ids: its servers carry its root
        try:
            await store.create(L.id, L.root.encode())
        except NodeExistsError:
            pass
        got = await store.get(L.id)
    raw = got[0] if got is not None else b""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if not _ID.match(text) and text != L.root:
        raise FsError(errno.EIO, f"{L.id} does not hold a deployment id (32 hex digits)")
    secured = await store.secure(L.root)  # a tree made before ACLs (or by a daemon without a credential)
    if secured:
        log.warning("gave %d znodes of %s the deployment's ACL", secured, L.root)
    return text

