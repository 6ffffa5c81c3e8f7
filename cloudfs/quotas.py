"""Process quotas, in the spirit of Xenstore's per-domain quotas: what one
process (and the code in its VM) may make the deployment hold.

Each process has a znode ``proc/<pid>/quota`` (JSON: ``limits`` and
``used``) with six limits:

- ``descendants``: how many processes its subtree may hold (itself not
  counted).  A fork adds one to the ``used`` of *every* ancestor, each a
  compare-and-set in the fork's own multi, so the limit is exact with
  concurrent forks on several daemons; a fork beyond any ancestor's limit
  fails with EAGAIN (fork(2) at RLIMIT_NPROC), naming the limit.  An ending
  process gives its count back to its ancestors in the multi that removes
  it.
- ``env-keys`` and ``env-bytes``: how many env keys the process may have
  set, and their values' bytes in all; a write beyond them fails with EDQUOT
  and changes nothing (the key and the quota znode change in one multi).
- ``notes``: how many notes may wait for the process to read them
  (cloudfs.notes; Plan 9 keeps NNOTE = 5 per process); a note posted
  beyond it fails with EAGAIN and is dropped, as Plan 9 drops it.
- ``pipes`` and ``pipe-bytes``: how many pipes the process may own
  (cloudfs.pipes; EAGAIN beyond it) and how many bytes of messages may wait
  unread in them (a write beyond it waits until the reader makes room).
- ``files`` and ``file-bytes``: how many entries (files and directories)
  of the shared tree ``/files`` the process may own, and their bytes
  (cloudfs.sharedfiles: a file is charged to the process that made it;
  EDQUOT beyond either).  ``file-bytes`` may be set up to 2^50.
  A quota znode from before notes, pipes or files counts none and gets the
  default limits.

A new process gets the daemon's defaults (:data:`DEFAULT_LIMITS`, or
``cloudfs up --limit NAME=VALUE``), but never more ``descendants`` than its
parent has left after the fork, nor more env than its parent's own limits.
Init's ``descendants`` is the deployment's process cap
(:data:`DEFAULT_MAX_PROCESSES`, ``--max-processes``).  ``/proc/<pid>/limits``
shows ``name limit used`` lines; the operator writes ``name value`` to set
one, a process may only lower its own or a descendant's (EPERM otherwise).
Processes made before quotas existed have no quota znode: they are counted
by nobody and limited by nothing but their ancestors' counts.

Everything here but :class:`Quotas` is pure.  Errors are FsError: EAGAIN
(fork over a limit), EDQUOT (env over a limit), EINVAL (a bad limits
write), EPERM (raising a limit from a process's view), CorruptRecord (EIO)
for a quota znode cloudfs would not write.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from ninep.errors import FsError

from .process import CorruptRecord, Versioned
from .records import no_process
from .store import BadVersionError, NoNodeError, Store
from .znodes import Layout

DESCENDANTS, ENV_KEYS, ENV_BYTES, NOTES = "descendants", "env-keys", "env-bytes", "notes"
PIPES, PIPE_BYTES = "pipes", "pipe-bytes"
FILES, FILE_BYTES = "files", "file-bytes"
#: The limits, in the order /proc/<pid>/limits lists them.
NAMES = (DESCENDANTS, ENV_KEYS, ENV_BYTES, NOTES, PIPES, PIPE_BYTES, FILES, FILE_BYTES)
#: Limits a new process gets unless the daemon is told others: a guest's
#: subtree of 16 VMs; 256 env keys and 1 MiB of env values per process;
#: 32 pending notes; 16 pipes holding 1 MiB of unread messages in all;
#: 4096 entries of /files holding 4 GiB.
DEFAULT_LIMITS: Mapping[str, int] = {DESCENDANTS: 16, ENV_KEYS: 256, ENV_BYTES: 1 << 20, NOTES: 32,
                                     PIPES: 16, PIPE_BYTES: 1 << 20, FILES: 4096, FILE_BYTES: 4 << 30}
#: Limits a quota znode written before that limit existed gets when read.
_ADDED_LATER: Mapping[str, int] = {n: DEFAULT_LIMITS[n] for n in (NOTES, PIPES, PIPE_BYTES, FILES, FILE_BYTES)}
#: Init's ``descendants``: the processes a deployment may hold in all.
DEFAULT_MAX_PROCESSES = 256
#: The largest value a limit may be set to (2^31 - 1), but see LIMIT_MAXES.
LIMIT_MAX = 2**31 - 1
#: Limits that may go higher than LIMIT_MAX (bytes of files).
LIMIT_MAXES: Mapping[str, int] = {FILE_BYTES: 2**50}


def limit_max(name: str) -> int:
    """The largest value limit (or count) ``name`` may hold."""
    return LIMIT_MAXES.get(name, LIMIT_MAX)


@dataclass(frozen=True)
class Quota:
    """One process's ``limits`` and ``used`` counts, by name (:data:`NAMES`)."""

    limits: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    used: Mapping[str, int] = field(default_factory=lambda: {n: 0 for n in NAMES})

    def left(self, name: str) -> int:
        """How much of ``name`` is still free (never below 0)."""
        return max(0, self.limits[name] - self.used[name])

    def using(self, **delta: int) -> "Quota":
        """A copy with ``used`` changed by ``delta`` (``env_keys=1`` for
        ``env-keys``), never below 0."""
        used = dict(self.used)
        for k, v in delta.items():
            name = k.replace("_", "-")
            used[name] = max(0, used[name] + v)
        return Quota(dict(self.limits), used)

    def limited(self, name: str, value: int) -> "Quota":
        """A copy with limit ``name`` set to ``value``."""
        return Quota({**self.limits, name: value}, dict(self.used))

    def text(self) -> bytes:
        """The content of ``/proc/<pid>/limits``: ``name limit used`` lines."""
        return "".join(f"{n} {self.limits[n]} {self.used[n]}\n" for n in NAMES).encode()

    def to_json(self) -> bytes:
        return json.dumps({"limits": dict(self.limits), "used": dict(self.used)}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Quota":
        """Parse a quota znode; CorruptRecord unless every limit and count is
        an integer in 0..LIMIT_MAX."""
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise CorruptRecord("quota", "not JSON") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("limits"), dict) or not isinstance(raw.get("used"), dict):
            raise CorruptRecord("quota", "not {limits, used}")
        out = {}
        for part in ("limits", "used"):
            vals = {}
            for n in NAMES:
                if n in _ADDED_LATER and n not in raw[part]:
                    vals[n] = _ADDED_LATER[n] if part == "limits" else 0
                    continue
                v = raw[part].get(n)
                if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= limit_max(n):
                    raise CorruptRecord("quota", f"{part}.{n} is {v!r}")
                vals[n] = v
            out[part] = vals
        return cls(out["limits"], out["used"])


def child_quota(parent: Quota | None, defaults: Mapping[str, int]) -> Quota:
    """The quota of a new child of ``parent`` (already charged for the
    child; None for a parent without quota): the ``defaults``, but no more
    descendants than the parent has left, no more env than its limits."""
    limits = dict(defaults)
    if parent is not None:
        limits[DESCENDANTS] = min(limits[DESCENDANTS], parent.left(DESCENDANTS))
        for n in (ENV_KEYS, ENV_BYTES, FILES, FILE_BYTES):
            if n in limits and n in parent.limits:
                limits[n] = min(limits[n], parent.limits[n])
    return Quota(limits, {n: 0 for n in NAMES})


def charge_fork(chain: list[tuple[int, Quota]]) -> list[Quota]:
    """The quotas of a new process's ancestors (``(pid, quota)``, parent
    first) after counting it.  FsError(EAGAIN) naming the first limit it
    would pass."""
    out = []
    for pid, q in chain:
        if q.used[DESCENDANTS] + 1 > q.limits[DESCENDANTS]:
            raise FsError(errno.EAGAIN, f"fork: process {pid} may have at most {q.limits[DESCENDANTS]} descendants "
                                        f"(limit {DESCENDANTS}; {q.used[DESCENDANTS]} in use)")
        out.append(q.using(descendants=1))
    return out


def charge_env(pid: int, q: Quota, old: int | None, new: int) -> Quota:
    """``q`` after key of value length ``old`` (None: not set) gets a value
    of ``new`` bytes (None is not allowed for ``new``: see
    :func:`release_env`).  FsError(EDQUOT) over ``env-keys`` or
    ``env-bytes``."""
    keys = q.used[ENV_KEYS] + (1 if old is None else 0)
    size = q.used[ENV_BYTES] - (old or 0) + new
    if keys > q.limits[ENV_KEYS]:
        raise FsError(errno.EDQUOT, f"process {pid} may set at most {q.limits[ENV_KEYS]} env keys (limit {ENV_KEYS})")
    if size > q.limits[ENV_BYTES] and size > q.used[ENV_BYTES]:
        raise FsError(errno.EDQUOT, f"process {pid} may hold at most {q.limits[ENV_BYTES]} bytes of env values "
                                    f"(limit {ENV_BYTES}; {q.used[ENV_BYTES]} in use)")
    return Quota(dict(q.limits), {**q.used, ENV_KEYS: keys, ENV_BYTES: size})


def release_env(q: Quota, old: int) -> Quota:
    """``q`` after a key of value length ``old`` is unset."""
    return q.using(env_keys=-1, env_bytes=-old)


def charge_note(pid: int, q: Quota) -> Quota:
    """``q`` after one more note waits for ``pid``.  FsError(EAGAIN) over
    ``notes`` (the note is not posted)."""
    if q.used[NOTES] + 1 > q.limits[NOTES]:
        raise FsError(errno.EAGAIN, f"process {pid} has {q.used[NOTES]} notes not yet read (limit {NOTES})")
    return q.using(notes=1)


def parse_setting(data: bytes) -> tuple[str, int]:
    """One write to ``/proc/<pid>/limits``: ``name value`` (a trailing
    newline is fine).  FsError(EINVAL) naming what is wrong."""
    try:
        words = data.decode("ascii").split()
    except UnicodeDecodeError:
        raise FsError(errno.EINVAL, "limits: write 'name value' in ASCII") from None
    if len(words) != 2 or words[0] not in NAMES:
        raise FsError(errno.EINVAL, f"limits: write 'name value' with name one of {', '.join(NAMES)}")
    name, value = words
    top = limit_max(name)
    if not value.isascii() or not value.isdigit() or len(value) > len(str(top)) or int(value) > top:
        raise FsError(errno.EINVAL, f"limits: {name} must be a whole number from 0 to {top}")
    return name, int(value)


class Quotas:
    """Reading and setting the quota znodes of the deployment's processes."""

    def __init__(self, store: Store, layout: Layout):
        self.store = store
        self.layout = layout

    async def get(self, pid: int) -> Versioned[Quota] | None:
        """Process ``pid``'s quota and its znode version; None if it has none
        (no such process, or one made before quotas)."""
        got = await self.store.get(self.layout.quota(pid))
        if got is None:
            return None
        return Versioned(Quota.from_json(got[0]), got[1].version)

    async def set_limit(self, pid: int, name: str, value: int, *, only_lower: bool) -> None:
        """Set limit ``name`` of ``pid`` (compare-and-set, retried).
        ``only_lower`` (a process's view): EPERM if ``value`` is above the
        current limit.  ENOENT if there is no such process; EINVAL for a
        process without a quota znode."""
        while True:
            cur = await self.get(pid)
            if cur is None:
                if await self.store.exists(self.layout.record(pid)) is None:
                    raise no_process(pid)
                raise FsError(errno.EINVAL, f"process {pid} has no limits (it was made before limits existed)")
            if only_lower and value > cur.value.limits[name]:
                raise FsError(errno.EPERM, f"a process may only lower its limits: {name} of process {pid} "
                                           f"is {cur.value.limits[name]}")
            try:
                await self.store.set(self.layout.quota(pid), cur.value.limited(name, value).to_json(), cur.version)
                return
            except BadVersionError:
                continue
            except NoNodeError:
                raise no_process(pid) from None
