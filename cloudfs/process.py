"""The process record: what ZooKeeper holds about one process (a VM or init).

States (observed, written by fork and the reconciler):

- ``new``: no image yet (a fork of init); write userdata, then ``exec``;
- ``creating``: the compute driver is creating or rebuilding the VM;
- ``running``, ``stopped``: as the driver reports;
- ``exited``, ``killed``: final states, seen only in wait records (the
  process leaves /proc when it ends);
- ``error``: the driver failed; ``error`` holds its message.

``desired`` is what ctl asked for (``new``, ``running``, ``stopped``,
``killed``); the reconciler drives ``state`` towards it.  ``gen`` counts
exec requests and ``built_gen`` the one the VM was built from, so a rebuild is
pending while they differ.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

STATES = ("new", "creating", "running", "stopped", "exited", "killed", "error")
DESIRED = ("new", "running", "stopped", "killed")
FINAL_STATES = ("exited", "killed")


def now_iso() -> str:
    """The current UTC time as ``2026-11-21T06:15:30Z`` (ISO 8601)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Process:
    """One process record.  JSON round trip with :meth:`to_json`/:meth:`from_json`.

    ``pid``/``ppid`` small integers (init: 1/0); ``name`` a label; ``image``,
    ``flavor`` names the driver knows (None for init and ``new`` processes);
    ``networks`` network names; ``host`` and ``addresses`` as the driver
    reports; ``created`` ISO 8601 UTC; ``vm`` the driver's server id;
    ``secret`` the process's 9P credential (hex, made at fork by
    :func:`cloudfs.identity.new_secret`; never shown in ``status``; empty for
    init and for records written before credentials existed); ``scope``
    the :attr:`~cloudfs.drivers.base.ComputeDriver.scope` of the driver
    that made ``vm`` (only daemons with that scope act on it; empty for
    records written before scopes existed: any daemon).
    """

    pid: int
    ppid: int
    name: str
    state: str = "new"
    desired: str = "new"
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

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Process":
        """Parse a record; unknown keys are ignored (forward compatible)."""
        raw = json.loads(data)
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @property
    def has_image(self) -> bool:
        return self.image is not None

    def status_text(self) -> str:
        """The content of ``/proc/<pid>/status``: one ``key value`` line per
        field; empty values are ``-``; ``error`` only in state error."""
        rows = [
            ("pid", str(self.pid)),
            ("ppid", str(self.ppid)),
            ("name", self.name),
            ("state", self.state),
            ("desired", self.desired),
            ("image", self.image or "-"),
            ("flavor", self.flavor or "-"),
            ("networks", " ".join(self.networks) or "-"),
            ("host", self.host or "-"),
            ("addresses", " ".join(self.addresses) or "-"),
            ("created", self.created),
        ]
        if self.state == "error":
            rows.append(("error", self.error or "-"))
        return "".join(f"{k} {v}\n" for k, v in rows)


def init_record() -> Process:
    """Pid 1: the root of the deployment, not a VM (state running, no image)."""
    return Process(pid=1, ppid=0, name="init", state="running", desired="running")


@dataclass
class WaitRecord:
    """What ``/proc/<pid>/wait`` returns for one ended child:
    ``<pid> <name> <state> <message>\\n`` (one line)."""

    pid: int
    name: str
    state: str
    message: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "WaitRecord":
        return cls(**json.loads(data))

    def line(self) -> str:
        msg = " ".join(self.message.split())
        return f"{self.pid} {self.name} {self.state} {msg}".rstrip() + "\n"
