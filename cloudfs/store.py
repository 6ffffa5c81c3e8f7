"""The ZooKeeper store: kazoo driven from trio, without ever blocking the loop.

Every operation uses kazoo's asynchronous API (``get_async`` …): the request is
queued to kazoo's connection thread, and the completion callback (run on
kazoo's completion thread) only hands a wake-up to trio through
``TrioToken.run_sync_soon``.  This is cheaper than a worker thread per call
(fork latency is a few ZooKeeper round trips) and lets a trio cancellation
(Tflush, a dead reader) abandon the wait at once.  Each call has a deadline
(``op_timeout`` seconds) after which it fails with EIO.

Watches: :meth:`Store.wait_set` and :meth:`Store.wait_children` block until a
znode exists / has children.  They register a trio Event in a registry keyed
by znode path *before* arming a one-shot ZooKeeper watch (a child watch on
the parent directory in both cases, so the watches a session holds are
bounded by the directories waited on, never by the names asked for); the
watch callback
only schedules ``_fire(path)`` in trio, which sets every Event of that path.
Entries are removed in ``finally``, so a cancelled waiter leaves nothing
behind (:meth:`Store.waiter_count` is 0 when no one waits).

Connection states (kazoo's ``KazooState``):

- SUSPENDED (connection dropped, session may survive): new operations wait
  up to ``suspend_wait`` seconds for the connection, then fail with EAGAIN.
  Nothing is cached, so nothing stale can be served.
- LOST (session expired: watches and ephemeral znodes are gone): operations
  fail with EIO until kazoo has a new session (it reconnects by itself).
- CONNECTED again: every blocked waiter is woken to re-read and re-arm its
  watch, and the ``on_reconnect`` callbacks run (the reconciler rescans).

Errors: ZooKeeper's answers that callers act on (``NoNodeError``,
``NodeExistsError``, ``BadVersionError``, ``NotEmptyError``) are raised as the
kazoo exceptions; connection failures become ``FsError(EAGAIN)`` (connection
loss, retry) or ``FsError(EIO)`` (session expired, closed, timeout).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import trio
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    BadVersionError,
    ConnectionClosedError,
    ConnectionLoss,
    KazooException,
    NoAuthError,
    NoNodeError,
    NodeExistsError,
    NotEmptyError,
    OperationTimeoutError,
    RolledBackError,
    SessionExpiredError,
)
from kazoo.protocol.states import ZnodeStat
from kazoo.security import OPEN_ACL_UNSAFE, make_digest_acl

from ninep.errors import FsError

T = TypeVar("T")


class Unreachable(FsError):
    """ZooKeeper could not be asked or did not answer (EAGAIN: connection
    suspended or lost; EIO: session lost, or no answer within the
    deadline).  A write that fails so may or may not have been applied."""

log = logging.getLogger(__name__)

#: Seconds a watched cache entry (Store.cached_get) is trusted at most.
CACHE_TTL = 2.0
#: kazoo methods that only read (Store.many keeps the cache for these).
_READS = frozenset({"get_async", "exists_async", "get_children_async"})

__all__ = [
    "Store",
    "NoNodeError",
    "NodeExistsError",
    "BadVersionError",
    "NotEmptyError",
    "ZnodeStat",
    "txn_error",
]

#: kazoo exceptions that are answers about the data, passed to callers as is.
_ANSWERS = (NoNodeError, NodeExistsError, BadVersionError, NotEmptyError)


class _Listing:
    """A directory's children as last listed with its child watch armed
    (``names``; None once the watch fired), shared by :meth:`Store.wait_set`'s
    waiters on it (``users``); ``gen`` counts the watch's firings."""

    __slots__ = ("names", "gen", "lock", "users")

    def __init__(self) -> None:
        self.names: frozenset[str] | None = None
        self.gen = 0
        self.lock = trio.Lock()
        self.users = 0


def txn_error(results: Sequence[Any]) -> Exception | None:
    """The exception that made a ZooKeeper multi (transaction) fail, or None.

    ``results`` is what ``TransactionRequest.commit`` returns: one entry per
    operation, failed operations as exception instances (the others
    ``RolledBackError``).
    """
    for r in results:
        if isinstance(r, Exception) and not isinstance(r, RolledBackError):
            return r
    return None


class Store:
    """One kazoo session to ZooKeeper, used from trio.

    ``hosts`` is a kazoo connection string: one server or an ensemble
    (``"zk1:2181,zk2:2181,zk3:2181"``), optionally with a chroot
    (``"…,zk3:2181/cloudfs-prod"``: every path is then below it; it is made,
    with ZooKeeper's open ACL like ``/cloudfs``, on first start); loopback
    only in tests.  ``session_timeout`` (s) is ZooKeeper's session timeout,
    ``op_timeout`` (s) the deadline of one operation, ``suspend_wait`` (s) how
    long an operation waits for a dropped connection before EAGAIN.

    Use ``await store.start()`` inside ``trio.run`` (it captures the trio
    token) and ``await store.close()`` at the end.
    """

    def __init__(
        self,
        hosts: str,
        *,
        session_timeout: float = 10.0,
        op_timeout: float = 10.0,
        suspend_wait: float = 2.0,
        auth: str | None = None,
    ):
        self.hosts = hosts
        self.op_timeout = op_timeout
        self.suspend_wait = suspend_wait
        #: the ACL every znode this session creates gets (None: ZooKeeper's open ACL)
        self.acl = None
        extra: dict[str, Any] = {}
        if auth is not None:
            user, sep, password = auth.partition(":")
            if not sep or not user or not password:
                raise ValueError("a ZooKeeper digest credential is 'user:password'")
            self.acl = [make_digest_acl(user, password, all=True)]
            extra = {"auth_data": [("digest", auth)], "default_acl": self.acl}
        self.client = KazooClient(
            hosts=hosts,
            timeout=session_timeout,
            connection_retry={"max_tries": -1, "delay": 0.05, "backoff": 1.5, "max_delay": 0.5},
            **extra,
        )
        self._token: trio.lowlevel.TrioToken | None = None
        self._state = KazooState.LOST
        self._connected = trio.Event()
        self._waiters: dict[str, set[trio.Event]] = {}
        self._listings: dict[str, _Listing] = {}  # wait_set's shared directory listings
        # cached_get: znode path -> (data, stat), valid while its data watch is
        # armed and the connection is CONNECTED; _cache_gen counts invalidations.
        self._cache: dict[str, tuple[Any, ZnodeStat, float]] = {}
        self._cache_gen = 0
        self.on_reconnect: list[Callable[[bool], None]] = []
        #: how many times the session was lost (each LOST adds one)
        self.sessions_lost = 0
        self._was_lost = False

    # -- lifecycle ------------------------------------------------------

    async def start(self, timeout: float = 15.0) -> None:
        """Connect (blocking kazoo ``start`` runs in a worker thread).

        Raises FsError(EIO) when ZooKeeper does not answer within ``timeout`` s.
        """
        self._token = trio.lowlevel.current_trio_token()
        self.client.add_listener(self._listener)
        try:
            await trio.to_thread.run_sync(self._make_chroot, timeout)
            await trio.to_thread.run_sync(self.client.start, timeout)
        except Exception as e:  # kazoo raises its timeout as a plain exception
            raise FsError(errno.EIO, f"cannot connect to ZooKeeper at {self.hosts}: {e}") from e
        # kazoo's own view: its listener may already have reported a drop
        self._set_state(self.client.state)

    def _make_chroot(self, timeout: float) -> None:
        """Make the connect string's chroot if it has one (a short session
        without the chroot; blocking)."""
        chroot = self.client.chroot
        if not chroot:
            return
        bare = KazooClient(hosts=self.hosts.split("/", 1)[0], timeout=timeout)
        bare.start(timeout)
        try:
            bare.ensure_path(chroot)
        finally:
            bare.stop()
            bare.close()

    async def close(self) -> None:
        """Close the session (ephemeral znodes vanish) and stop kazoo's threads."""

        def stop() -> None:
            try:
                self.client.stop()
                self.client.close()
            except Exception:  # closing must not raise
                log.exception("closing kazoo")

        self.client.remove_listener(self._listener)
        await trio.to_thread.run_sync(stop)
        self._fire_all()

    # -- connection state -----------------------------------------------

    def _listener(self, state: str) -> None:
        # kazoo's connection thread: hand over, never block.
        self._soon(self._set_state, state)

    def _soon(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            if self._token is not None:
                self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    def _set_state(self, state: str) -> None:
        old = self._state
        self._state = state
        if state == KazooState.CONNECTED:
            if not self._connected.is_set():
                self._connected.set()
            if old != KazooState.CONNECTED:
                lost = self._was_lost
                self._was_lost = False
                self._fire_all()
                for cb in list(self.on_reconnect):
                    try:
                        cb(lost)
                    except Exception:
                        log.exception("on_reconnect callback")
        else:
            # a suspended or lost session may miss watch events: forget all
            self._cache.clear()
            self._cache_gen += 1
            if state == KazooState.LOST:
                if old != KazooState.LOST:
                    self.sessions_lost += 1
                self._was_lost = True
            if self._connected.is_set():
                self._connected = trio.Event()

    @property
    def state(self) -> str:
        """``"CONNECTED"``, ``"SUSPENDED"`` or ``"LOST"`` as trio last saw it."""
        return self._state

    async def _ready(self) -> None:
        if self._state == KazooState.CONNECTED:
            return
        with trio.move_on_after(self.suspend_wait):
            await self._connected.wait()
            return
        if self._state == KazooState.LOST:
            raise Unreachable(errno.EIO, "ZooKeeper session lost; reconnecting")
        raise Unreachable(errno.EAGAIN, "ZooKeeper connection suspended; try again")

    # -- operations -----------------------------------------------------

    async def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one kazoo ``*_async`` method and wait for its result in trio."""
        await self._ready()
        done = trio.Event()
        result = method(*args, **kwargs)
        result.rawlink(lambda _r: self._soon(done.set))
        with trio.move_on_after(self.op_timeout):
            await done.wait()
        if not done.is_set():
            raise Unreachable(errno.EIO, f"ZooKeeper did not answer within {self.op_timeout:g}s")
        exc = result.exception
        if exc is None:
            return result.value
        if isinstance(exc, _ANSWERS):
            raise exc
        if isinstance(exc, (ConnectionLoss, OperationTimeoutError)):
            raise Unreachable(errno.EAGAIN, "ZooKeeper connection lost; try again") from exc
        if isinstance(exc, (SessionExpiredError, ConnectionClosedError)):
            raise Unreachable(errno.EIO, "ZooKeeper session lost") from exc
        if isinstance(exc, NoAuthError):
            raise FsError(errno.EACCES, "ZooKeeper refused: this daemon's credential is not the deployment's "
                                        "(cloudfs up --zookeeper-auth)") from exc
        if isinstance(exc, KazooException):
            raise FsError(errno.EIO, f"ZooKeeper error: {type(exc).__name__}") from exc
        raise exc

    async def get(self, path: str, watch: bool = False) -> tuple[bytes, ZnodeStat] | None:
        """``(data, stat)`` of ``path``, or None if it does not exist."""
        try:
            return await self._call(self.client.get_async, path, self._watch if watch else None)
        except NoNodeError:
            return None

    async def _write(self, method: Callable[..., Any], *args: Any) -> Any:
        """A call that changes znodes.  The watched cache is dropped before and
        after it: kazoo may hand the call's completion to trio before the
        watch event, and this daemon must never read its own change's old
        value from memory."""
        self._forget_cache()
        try:
            return await self._call(method, *args)
        finally:
            self._forget_cache()

    def _forget_cache(self) -> None:
        self._cache.clear()
        self._cache_gen += 1

    async def cached_get(self, path: str, decode: Callable[[bytes], Any] = bytes) -> tuple[Any, ZnodeStat] | None:
        """``(decode(data), stat)`` of ``path`` like :meth:`get`, answered
        from memory while nothing changed; None if it does not exist.

        The first read arms a ZooKeeper data watch; its event (a change or
        deletion by any daemon) drops the entry, and so does leaving CONNECTED
        (a suspended or lost session may miss events).  A value read while
        any invalidation happened is not kept, and every write of this store
        drops the whole cache, so this daemon always reads its own changes.
        Another daemon's change is seen as soon as its watch event reaches
        trio (ZooKeeper sends it before this session could read the new
        data; kazoo's event thread adds moments).  Entries older
        than ``CACHE_TTL`` seconds are read again: that bounds how stale an
        answer can be while a connection has died silently (a partition kazoo
        has not noticed yet; a direct read would then fail).  Missing znodes
        are not cached.  The decoded value is shared by every caller until the
        znode changes (use one ``decode`` per path; never mutate the value).
        For reads that serve files; compare-and-set paths read directly.
        """
        now = trio.current_time()
        if self._state == KazooState.CONNECTED:
            hit = self._cache.get(path)
            if hit is not None and now - hit[2] < CACHE_TTL:
                return hit[0], hit[1]
        gen = self._cache_gen
        got = await self.get(path, watch=True)
        if got is None:
            return None
        value = decode(got[0])
        if self._cache_gen == gen and self._state == KazooState.CONNECTED:
            self._cache[path] = (value, got[1], now)
        return value, got[1]

    async def exists(self, path: str, watch: bool = False) -> ZnodeStat | None:
        """The stat of ``path`` or None; ``watch`` arms a one-shot watch."""
        return await self._call(self.client.exists_async, path, self._watch if watch else None)

    async def children(self, path: str, watch: bool = False) -> list[str] | None:
        """The child names of ``path`` (unsorted), or None if it does not exist."""
        try:
            return await self._call(self.client.get_children_async, path, self._watch if watch else None)
        except NoNodeError:
            return None

    async def create(
        self, path: str, data: bytes = b"", *, ephemeral: bool = False, sequence: bool = False,
        makepath: bool = False,
    ) -> str:
        """Create ``path``; returns the created path (with sequence suffix).
        NodeExistsError / NoNodeError (missing parent) as kazoo raises them."""
        return await self._write(
            self.client.create_async, path, data, None, ephemeral, sequence, makepath
        )

    async def set(self, path: str, data: bytes, version: int = -1) -> ZnodeStat:
        """Replace ``path``'s data (BadVersionError if ``version`` != -1 and differs)."""
        return await self._write(self.client.set_async, path, data, version)

    async def delete(self, path: str, version: int = -1) -> None:
        """Delete one znode (NoNodeError, NotEmptyError, BadVersionError)."""
        await self._write(self.client.delete_async, path, version)

    async def ensure_path(self, path: str, *, open_acl: bool = False) -> None:
        """Create ``path`` and its missing parents (no error if it exists),
        with this session's ACL, or ZooKeeper's open one when ``open_acl``
        (for parents several deployments share)."""
        await self._write(self.client.ensure_path_async, path, OPEN_ACL_UNSAFE if open_acl else None)

    async def is_secured(self, root: str) -> bool | None:
        """Whether ``root`` carries this session's ACL (None: no such znode).
        :meth:`secure` sets it last, so it means the whole tree has it."""
        try:
            acls, _ = await self._call(self.client.get_acls_async, root)
        except NoNodeError:
            return None
        return self.acl is None or list(acls) == list(self.acl)

    async def secure(self, root: str) -> int:
        """Give every znode of the tree at ``root`` this session's ACL where
        it is not there yet (a tree made before ACLs), children before
        parents and ``root`` last, so that a walk cut short (a lost
        connection, a killed daemon) leaves ``root`` open and the next one
        starts over; returns how many znodes changed."""
        if self.acl is None or await self.is_secured(root) is not False:
            return 0
        changed = 0
        order: list[str] = []
        todo = [root]
        while todo:  # every path, parents before children
            path = todo.pop()
            order.append(path)
            todo += [f"{path}/{name}" for name in await self.children(path) or ()]
        for path in reversed(order):
            try:
                acls, _ = await self._call(self.client.get_acls_async, path)
                if list(acls) != list(self.acl):
                    await self._call(self.client.set_acls_async, path, self.acl)
                    changed += 1
            except NoNodeError:
                continue
        return changed

    async def sync(self, path: str) -> None:
        """ZooKeeper ``sync``: reads after it see every write the leader
        committed before it (a read after a write whose answer was lost)."""
        await self._call(self.client.sync_async, path)

    def transaction(self):
        """A kazoo ``TransactionRequest``; add ops, then ``await store.commit(t)``."""
        return self.client.transaction()

    async def commit(self, txn) -> list[Any]:
        """Commit a multi atomically; raises the failing op's exception
        (NodeExistsError, BadVersionError …) if it was rolled back."""
        results = await self._write(txn.commit_async)
        err = txn_error(results)
        if isinstance(err, NoAuthError):
            raise FsError(errno.EACCES, "ZooKeeper refused: this daemon's credential is not the deployment's "
                                        "(cloudfs up --zookeeper-auth)") from err
        if err is not None:
            raise err
        return results

    async def many(self, method_name: str, args: Sequence[tuple]) -> list[Any]:
        """Pipeline many calls of one kazoo ``*_async`` method; results (or the
        exception instances) in order.  Used for bulk reads and loads."""
        if method_name not in _READS:
            self._forget_cache()
            try:
                return await self._many(method_name, args)
            finally:
                self._forget_cache()
        return await self._many(method_name, args)

    async def _many(self, method_name: str, args: Sequence[tuple]) -> list[Any]:
        await self._ready()
        method = getattr(self.client, method_name)
        pending = [method(*a) for a in args]
        remaining = len(pending)
        done = trio.Event()

        def one(_r: Any) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                done.set()

        if not pending:
            return []
        for r in pending:
            r.rawlink(lambda r: self._soon(one, r))
        with trio.move_on_after(self.op_timeout * 3):
            await done.wait()
        if not done.is_set():
            raise Unreachable(errno.EIO, "ZooKeeper did not answer in time")
        out = []
        for r in pending:
            exc = r.exception
            if exc is not None and not isinstance(exc, _ANSWERS):
                if isinstance(exc, (ConnectionLoss, OperationTimeoutError, SessionExpiredError, ConnectionClosedError)):
                    raise Unreachable(errno.EAGAIN, f"ZooKeeper failed: {type(exc).__name__}")
                raise FsError(errno.EAGAIN, f"ZooKeeper failed: {type(exc).__name__}")
            out.append(exc if exc is not None else r.value)
        return out

    # -- watches and blocking waits --------------------------------------

    def _watch(self, event: Any) -> None:
        # kazoo's event thread: hand over, never block.
        self._soon(self._fire, event.path)

    def _fire(self, path: str) -> None:
        self._cache.pop(path, None)
        self._cache_gen += 1
        lst = self._listings.get(path)
        if lst is not None:
            lst.names = None
            lst.gen += 1
        for ev in self._waiters.get(path, ()):
            ev.set()

    def _fire_all(self) -> None:
        for lst in self._listings.values():
            lst.names = None
            lst.gen += 1
        for evs in self._waiters.values():
            for ev in evs:
                ev.set()

    def _register(self, path: str) -> trio.Event:
        ev = trio.Event()
        self._waiters.setdefault(path, set()).add(ev)
        return ev

    def _unregister(self, path: str, ev: trio.Event) -> None:
        evs = self._waiters.get(path)
        if evs is not None:
            evs.discard(ev)
            if not evs:
                del self._waiters[path]

    def waiter_count(self, under: str = "") -> int:
        """How many waits are registered now on paths starting with ``under``
        (0 when no read is blocked there)."""
        return sum(len(v) for p, v in self._waiters.items() if p.startswith(under))

    async def wait_set(self, path: str, parent: str, name: str, nonblocking: bool = False) -> bytes:
        """The data of ``path`` (the child ``name`` of ``parent``), waiting
        until the znode exists.

        Woken by a child watch on ``parent`` (never by polling, and never by
        a watch on ``path`` itself: a read of a name that is never set, then
        abandoned, would leave that watch in kazoo and in ZooKeeper for the
        session's life; one child watch per parent is all a session ever
        holds, however many names are waited for).  Every waiter of one
        parent shares one listing per change (:meth:`_listing`): n waiters
        cost one round trip per change, plus a read by the one whose name
        appeared.  With ``nonblocking`` a missing znode is FsError(EAGAIN);
        FsError(ENOENT) when ``parent`` does not exist or is deleted while
        waiting (its owner ended).  Cancellation leaves no waiter behind.
        """
        first = True
        while True:
            with self.watching(parent) as ev, self._listing_of(parent) as listing:
                if first:  # the fast path: one round trip when it is set
                    got = await self.get(path)
                    if got is not None:
                        return got[0]
                    if nonblocking:
                        raise FsError(errno.EAGAIN, "not set yet")
                    first = False
                names = await self.while_blocked(lambda: self._listing(parent, listing))
                if names is None:
                    raise FsError(errno.ENOENT, "no such file: its directory is gone")
                if name in names:
                    got = await self.while_blocked(lambda: self.get(path))
                    if got is not None:
                        return got[0]
                    # listed, then deleted: its deletion fires the watch
                await ev.wait()

    async def while_blocked(self, fn: Callable[[], Awaitable[T]]) -> T:
        """``await fn()`` for a reader that already waits: when ZooKeeper
        cannot be reached (:class:`Unreachable`: suspended, session lost, no
        answer) wait for the session to be back and ask again (backing off
        up to 1 s), instead of failing; any other error is raised.  A blocked read waits across an outage, as it would have had
        nothing changed; the errors stay for reads that have not blocked yet.
        A session loss wakes every waiter (kazoo fires its watches), and the
        new session's first look arms the watch again."""
        pause = 0.05
        while True:
            try:
                return await fn()
            except Unreachable:
                pass
            await self.wait_connected()
            await trio.sleep(pause)  # connected but unanswered (EIO after op_timeout): no hot loop
            pause = min(1.0, pause * 2)

    @contextmanager
    def _listing_of(self, parent: str) -> Iterator["_Listing"]:
        """The shared listing of ``parent``, kept while someone waits on it."""
        lst = self._listings.get(parent)
        if lst is None:
            lst = self._listings[parent] = _Listing()
        lst.users += 1
        try:
            yield lst
        finally:
            lst.users -= 1
            if lst.users == 0 and self._listings.get(parent) is lst:
                del self._listings[parent]

    async def _listing(self, parent: str, lst: "_Listing") -> frozenset[str] | None:
        """``parent``'s children as listed with its child watch armed, read
        again only after the watch fired (or the connection changed): one
        listing per change for all waiters.  None if it does not exist."""
        async with lst.lock:
            if lst.names is None:
                gen = lst.gen
                names = await self.children(parent, watch=True)
                if names is None:
                    return None
                if lst.gen != gen:  # the watch fired meanwhile: this listing may predate it
                    return frozenset(names)
                lst.names = frozenset(names)
            return lst.names

    async def wait_children(self, path: str, nonblocking: bool = False) -> list[str]:
        """The children of ``path`` once there is at least one (child watch).

        FsError(ENOENT) if ``path`` does not exist; FsError(EAGAIN) with
        ``nonblocking`` when there are none yet.
        """
        first = True
        while True:
            ev = self._register(path)
            try:
                if first:
                    names = await self.children(path, watch=True)
                    first = False
                else:
                    names = await self.while_blocked(lambda: self.children(path, watch=True))
                if names is None:
                    raise FsError(errno.ENOENT, "no such file")
                if names:
                    return names
                if nonblocking:
                    raise FsError(errno.EAGAIN, "nothing to read yet")
                await ev.wait()
            finally:
                self._unregister(path, ev)

    @contextmanager
    def watching(self, *paths: str) -> Iterator[trio.Event]:
        """Register one Event for wake-ups on any of ``paths`` for the block.

        Usage: inside the block, read with ``watch=True`` (arming ZooKeeper's
        one-shot watch *after* registering, so no change is missed), act on
        what was read, then ``await event.wait()``.  The event is also set on
        reconnection.  The registration is removed on exit, even on cancel.
        """
        ev = trio.Event()
        for p in paths:
            self._waiters.setdefault(p, set()).add(ev)
        try:
            yield ev
        finally:
            for p in paths:
                self._unregister(p, ev)

    async def wait_connected(self) -> None:
        """Return once the session is CONNECTED (at once if it is)."""
        while self._state != KazooState.CONNECTED:
            await self._connected.wait()
