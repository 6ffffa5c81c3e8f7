"""The process record: what ZooKeeper holds about one process (a VM or init).

States (:class:`State`, observed: written by fork and the reconciler):

- ``new``: no image yet (a fork of init); write userdata, then ``exec``;
- ``creating``: the compute driver is creating or rebuilding the VM;
- ``running``, ``stopped``: as the driver reports;
- ``exited``, ``killed``: final states, seen only in wait records (the
  process leaves /proc when it ends);
- ``migrating``: the VM is moving to another host (``migrate HOST``);
- ``error``: the driver failed; ``error`` holds its message.

``desired`` (:class:`Desired`) is what ctl asked for (``new``, ``running``,
``stopped``, ``killed``); the reconciler drives ``state`` towards it
(cloudfs.decisions).  ``gen`` counts exec requests and ``built_gen`` the one
the VM was built from, so a rebuild is pending while they differ.

Records come back from ZooKeeper, which other programs can write: parsing
checks every field's type and value and raises :class:`CorruptRecord`
(EIO) instead of handing on anything malformed.
"""

from __future__ import annotations

import enum
import errno
import json
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Generic, TypeVar

from ninep.errors import FsError


class State(enum.StrEnum):
    """A process's observed state (``status``'s ``state``)."""

    NEW = "new"
    CREATING = "creating"
    RUNNING = "running"
    STOPPED = "stopped"
    MIGRATING = "migrating"
    EXITED = "exited"
    KILLED = "killed"
    ERROR = "error"


class Desired(enum.StrEnum):
    """What ctl asked for (``status``'s ``desired``)."""

    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"
    KILLED = "killed"


#: States a process ends in (only in wait records).
FINAL_STATES = frozenset({State.EXITED, State.KILLED})


class CorruptRecord(FsError):
    """A znode's data is not a record this code writes (EIO)."""

    def __init__(self, what: str, why: str):
        super().__init__(errno.EIO, f"corrupt {what} in ZooKeeper: {why}")


def now_iso() -> str:
    """The current UTC time as ``2026-11-21T06:15:30Z`` (ISO 8601)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


T = TypeVar("T")


@dataclass(frozen=True)
class Versioned(Generic[T]):
    """A value read from a znode with the znode's data version (ZooKeeper's
    ``Stat.version``), for compare-and-set writes."""

    value: T
    version: int


#: Field name → accepted JSON types (a record's schema).
_STR, _INT, _OPT_STR, _STRS = (str,), (int,), (str, type(None)), (list,)


@dataclass
class Process:
    """One process record.  JSON round trip with :meth:`to_json`/:meth:`from_json`.

    ``pid``/``ppid`` small integers (init: 1/0); ``name`` a label; ``image``,
    ``flavor`` names the driver knows (None for init and ``new`` processes);
    ``networks`` network names; ``host`` and ``addresses`` as the driver
    reports; ``created`` ISO 8601 UTC; ``vm`` the driver's server id;
    ``secret`` the process's 9P credential (hex, made at fork by
    :func:`cloudfs.identity.new_secret`; never shown in ``status``); ``scope``
    the :attr:`~cloudfs.drivers.base.ComputeDriver.scope` of the driver
    that made ``vm`` (only daemons with that scope act on it; empty: any);
    ``snapshot`` the driver's snapshot a ``fork live`` child is restored from
    (:meth:`~cloudfs.drivers.base.ComputeDriver.snapshot`; set with ``scope``
    at the fork, so only a daemon of the parent's scope creates it; cleared
    once its server is built); ``move_to`` the host ``migrate`` asked
    for (cleared when the move ends) and ``move`` what the last move did
    (``from A to B at T`` or ``to B failed: …``).
    """

    pid: int
    ppid: int
    name: str
    state: State = State.NEW
    desired: Desired = Desired.NEW
    image: str | None = None
    flavor: str | None = None
    networks: list[str] = field(default_factory=list)
    host: str = ""
    addresses: list[str] = field(default_factory=list)
    created: str = field(default_factory=now_iso)
    error: str = ""
    vm: str | None = None
    gen: int = 0
    built_gen: int = 0
    secret: str = ""
    scope: str = ""
    snapshot: str = ""
    move_to: str = ""
    move: str = ""

    def __post_init__(self) -> None:
        # states given as text (tests, callers) become the enums; ValueError if unknown
        self.state = State(self.state)
        self.desired = Desired(self.desired)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Process":
        """Parse a record; unknown keys are ignored (forward compatible).
        Raises CorruptRecord for anything else that is not a record."""
        raw = _json_object(data, "process record")
        what = f"record of process {raw.get('pid', '?')!r}"
        kw = {}
        for f in fields(cls):
            if f.name not in raw:
                continue
            v = raw[f.name]
            kinds = _SCHEMA[f.name]
            if not isinstance(v, kinds) or isinstance(v, bool):
                raise CorruptRecord(what, f"{f.name} is {type(v).__name__}")
            if kinds is _STRS and not all(isinstance(x, str) for x in v):
                raise CorruptRecord(what, f"{f.name} holds a non-string")
            kw[f.name] = v
        for k in ("pid", "ppid", "name"):
            if k not in kw:
                raise CorruptRecord(what, f"no {k}")
        try:
            if "state" in kw:
                kw["state"] = State(kw["state"])
            if "desired" in kw:
                kw["desired"] = Desired(kw["desired"])
        except ValueError as e:
            raise CorruptRecord(what, str(e)) from None
        if kw["pid"] < 1 or kw["ppid"] < 0:
            raise CorruptRecord(what, "pid or ppid out of range")
        return cls(**kw)

    @property
    def has_image(self) -> bool:
        return self.image is not None

    @property
    def built(self) -> bool:
        """The VM was built from the latest exec (no rebuild pending)."""
        return self.built_gen == self.gen

    def status_text(self) -> str:
        """The content of ``/proc/<pid>/status``: one ``key value`` line per
        field; empty values are ``-``; ``error`` only in state error."""
        rows = [
            ("pid", str(self.pid)),
            ("ppid", str(self.ppid)),
            ("name", self.name),
            ("state", str(self.state)),
            ("desired", str(self.desired)),
            ("image", self.image or "-"),
            ("flavor", self.flavor or "-"),
            ("networks", " ".join(self.networks) or "-"),
            ("host", self.host or "-"),
            ("addresses", " ".join(self.addresses) or "-"),
            ("created", self.created),
        ]
        if self.state is State.ERROR:
            rows.append(("error", self.error or "-"))
        if self.move_to or self.move:
            rows.append(("move", f"to {self.move_to}" if self.move_to else self.move))
        return "".join(f"{k} {_one_line(v)}\n" for k, v in rows)


_SCHEMA = {
    "pid": _INT, "ppid": _INT, "name": _STR, "state": _STR, "desired": _STR, "image": _OPT_STR,
    "flavor": _OPT_STR, "networks": _STRS, "host": _STR, "addresses": _STRS, "created": _STR, "error": _STR,
    "vm": _OPT_STR, "gen": _INT, "built_gen": _INT, "secret": _STR, "scope": _STR,
    "snapshot": _STR, "move_to": _STR, "move": _STR,
}


def _one_line(v: str) -> str:
    return " ".join(v.split()) or "-"


def _json_object(data: bytes, what: str) -> dict:
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptRecord(what, f"not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CorruptRecord(what, "not a JSON object")
    return raw


def init_record() -> Process:
    """Pid 1: the root of the deployment, not a VM (state running, no image)."""
    return Process(pid=1, ppid=0, name="init", state=State.RUNNING, desired=Desired.RUNNING)


@dataclass(frozen=True)
class WaitRecord:
    """What ``/proc/<pid>/wait`` returns for one ended child:
    ``<pid> <name> <state> <message>\\n`` (one line)."""

    pid: int
    name: str
    state: State
    message: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", State(self.state))

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "WaitRecord":
        """Parse a wait record; CorruptRecord if it is not one."""
        raw = _json_object(data, "wait record")
        pid, name, state, message = raw.get("pid"), raw.get("name"), raw.get("state"), raw.get("message", "")
        if not isinstance(pid, int) or isinstance(pid, bool) or not isinstance(name, str) \
                or not isinstance(message, str) or not isinstance(state, str) or state not in FINAL_STATES:
            raise CorruptRecord("wait record", "fields of the wrong type or value")
        return cls(pid, name, State(state), message)

    def line(self) -> str:
        msg = " ".join(self.message.split())
        return f"{self.pid} {' '.join(self.name.split())} {self.state} {msg}".rstrip() + "\n"
