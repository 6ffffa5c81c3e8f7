"""The znode layout of one cloudfs deployment, under a root such as
``/cloudfs/<deployment>`` (tests use a fresh root per test).

::

    <root>/id                        the deployment's unique id (32 hex digits),
                                     made with the tree; servers carry it
    <root>/nextpid                   decimal text: the next pid to hand out.  A
                                     versioned counter: fork sets it with the
                                     version it read, in the same multi as the
                                     child's znodes, so pids are race-free
                                     across daemons and never reused.
    <root>/proc/<pid>                JSON process record (cloudfs.process.Process)
    <root>/proc/<pid>/kids/<cpid>    empty: <cpid> is a child of <pid>
    <root>/proc/<pid>/userdata       the user-data bytes (≤ USERDATA_MAX)
    <root>/proc/<pid>/env/<key>      one env key; data is the value
    <root>/proc/<pid>/wait/w-<seq>   JSON wait record of an ended child
                                     (sequential: consumed in order)
    <root>/proc/<pid>/note/n-<seq>   a pending note (its text; sequential:
                                     taken in order, cloudfs.notes)
    <root>/proc/<pid>/pipe/<name>/…  a pipe, its messages and opens
                                     (cloudfs.pipes)
    <root>/proc/<pid>/quota          JSON limits and counts (cloudfs.quotas)
    <root>/pending/<pid>-<seq>       work for the reconciler: the record of
                                     <pid> may differ from the backend
    <root>/owners/<pid>              ephemeral: the daemon (its id as data)
                                     that acts on <pid> for the compute driver
    <root>/hosts/<name>              ephemeral: a live daemon (JSON, cloudfs.hosts)
    <root>/moves/<pid>               ephemeral: a QEMU VM being moved to another
                                     host by its daemon (JSON, cloudfs.moves)
    <root>/files                     JSON limits and counts of the shared
                                     tree /files (cloudfs.sharedfiles); the
                                     files themselves are in its backend

:class:`Layout` is the only code that builds or splits these paths: every
other module asks it.  Names read back from ZooKeeper are parsed here too and
are not trusted: a name that is not what this layout writes parses to None.

Images and networks live in the compute driver, not in ZooKeeper.
Pid 1 (init) is created with the layout; its record has no image.
"""

from __future__ import annotations

#: Largest user-data accepted, in bytes (Nova's limit is 65535 bytes of base64).
USERDATA_MAX = 65536
#: Largest env value, in bytes (well under ZooKeeper's 1 MiB znode limit).
ENV_VALUE_MAX = 256 * 1024
#: The pid of init, the root of the deployment.
INIT_PID = 1
#: Largest pid a name may carry (qid paths keep 24 bits of it; far beyond use).
PID_MAX = 2**31 - 1

_WAIT_PREFIX = "w-"
_NOTE_PREFIX = "n-"


def parse_pid(name: str) -> int | None:
    """A pid written as this layout writes it (decimal, no sign, no leading
    zero, 1..PID_MAX), else None: ``"7"`` → 7; ``"07"``, ``"+7"``, ``"x"`` → None."""
    if not name.isascii() or not name.isdigit() or (len(name) > 1 and name[0] == "0") or len(name) > 10:
        return None
    pid = int(name)
    return pid if 0 < pid <= PID_MAX else None


class Layout:
    """Znode paths under ``root`` (no trailing slash, e.g. ``/cloudfs/prod``).

    Path builders take pids (ints) and names this daemon checked (env keys
    valid per cloudfs.nodes.valid_key); parsers take child names read from
    ZooKeeper and return None for anything this layout would not write."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        #: the root's parent, shared by deployments (``/cloudfs``)
        self.parent = self.root.rsplit("/", 1)[0] or "/"
        self.id = f"{self.root}/id"
        self.nextpid = f"{self.root}/nextpid"
        self.proc = f"{self.root}/proc"
        self.pending = f"{self.root}/pending"
        self.owners = f"{self.root}/owners"
        self.hosts = f"{self.root}/hosts"
        self.moves = f"{self.root}/moves"
        #: JSON limits and counts of /files (cloudfs.sharedfiles)
        self.files_usage = f"{self.root}/files"

    # -- one process ------------------------------------------------------

    def record(self, pid: int) -> str:
        return f"{self.proc}/{pid}"

    def kids(self, pid: int) -> str:
        return f"{self.proc}/{pid}/kids"

    def kid(self, pid: int, child: int) -> str:
        return f"{self.proc}/{pid}/kids/{child}"

    def kid_entry(self, pid: int, name: str) -> str:
        """A child of ``kids`` by its name as listed (also one that is no pid)."""
        return f"{self.proc}/{pid}/kids/{name}"

    def userdata(self, pid: int) -> str:
        return f"{self.proc}/{pid}/userdata"

    def env(self, pid: int) -> str:
        return f"{self.proc}/{pid}/env"

    def env_key(self, pid: int, key: str) -> str:
        return f"{self.proc}/{pid}/env/{key}"

    def wait(self, pid: int) -> str:
        return f"{self.proc}/{pid}/wait"

    def wait_record(self, pid: int, name: str) -> str:
        """A wait record's znode from its child name (as listed under :meth:`wait`)."""
        return f"{self.proc}/{pid}/wait/{name}"

    def wait_prefix(self, pid: int) -> str:
        """The path to create a sequential wait record with."""
        return f"{self.proc}/{pid}/wait/{_WAIT_PREFIX}"

    def quota(self, pid: int) -> str:
        return f"{self.proc}/{pid}/quota"

    def notes(self, pid: int) -> str:
        return f"{self.proc}/{pid}/note"

    def note_record(self, pid: int, name: str) -> str:
        """A pending note's znode from its child name (as listed under :meth:`notes`)."""
        return f"{self.proc}/{pid}/note/{name}"

    def note_prefix(self, pid: int) -> str:
        """The path to create a sequential note with."""
        return f"{self.proc}/{pid}/note/{_NOTE_PREFIX}"

    def pipes(self, pid: int) -> str:
        return f"{self.proc}/{pid}/pipe"

    def pipe(self, pid: int, name: str) -> str:
        """A pipe's znode (``name`` checked, or as listed under :meth:`pipes`)."""
        return f"{self.proc}/{pid}/pipe/{name}"

    def process_subtree(self, pid: int) -> list[str]:
        """The fixed znodes of a process, parents first (created by fork;
        its quota and note znodes too, for processes made since those
        exist)."""
        return [self.record(pid), self.kids(pid), self.userdata(pid), self.env(pid), self.wait(pid)]

    def process_znodes(self, pid: int, env_keys: list[str], wait_names: list[str], quota: bool = True,
                       note_names: list[str] | None = None,
                       pipes: dict[str, list[str]] | None = None) -> list[str]:
        """Every znode of process ``pid`` with those env keys and wait
        records (and its quota znode when ``quota``; its note znode and
        those notes unless ``note_names`` is None, its pipe znode and those
        pipes, name → children, unless ``pipes`` is None: they are made
        with the first note or pipe), children before parents (the order
        to delete them in)."""
        paths = [self.env_key(pid, k) for k in env_keys] + [self.wait_record(pid, w) for w in wait_names]
        if note_names is not None:
            paths += [self.note_record(pid, n) for n in note_names] + [self.notes(pid)]
        if pipes is not None:
            for name, kids in pipes.items():
                paths += [f"{self.pipe(pid, name)}/{k}" for k in kids] + [self.pipe(pid, name)]
            paths.append(self.pipes(pid))
        return paths + ([self.quota(pid)] if quota else []) + self.process_subtree(pid)[::-1]

    # -- work items and owners ----------------------------------------------

    def move(self, pid: int) -> str:
        """``moves/<pid>``: the move of ``pid``'s VM in progress."""
        return f"{self.moves}/{pid}"

    def pending_prefix(self, pid: int) -> str:
        """The path to create a sequential work item for ``pid`` with."""
        return f"{self.pending}/{pid}-"

    def pending_item(self, name: str) -> str:
        """A work item's znode from its child name (as listed under ``pending``)."""
        return f"{self.pending}/{name}"

    def owner(self, pid: int) -> str:
        return f"{self.owners}/{pid}"

    # -- parsing names read from ZooKeeper ------------------------------------

    @staticmethod
    def pid_name(name: str) -> int | None:
        """The pid a child of ``proc``, ``kids`` or ``owners`` names, or None."""
        return parse_pid(name)

    @staticmethod
    def pending_pid(name: str) -> int | None:
        """The pid of a work item's child name ``<pid>-<seq>``, or None."""
        pid, sep, seq = name.rpartition("-")
        if not sep or not seq.isascii() or not seq.isdigit():
            return None
        return parse_pid(pid)

    @staticmethod
    def is_wait_name(name: str) -> bool:
        """Whether a child of ``wait`` is a wait record this layout wrote."""
        seq = name[len(_WAIT_PREFIX):]
        return name.startswith(_WAIT_PREFIX) and seq.isascii() and seq.isdigit()

    @staticmethod
    def is_note_name(name: str) -> bool:
        """Whether a child of ``note`` is a note this layout wrote."""
        seq = name[len(_NOTE_PREFIX):]
        return name.startswith(_NOTE_PREFIX) and seq.isascii() and seq.isdigit()

    def pids(self, names: list[str] | None) -> list[int]:
        """The pids among child names (of ``proc`` or ``kids``), ascending;
        anything else is left out."""
        return sorted(p for p in map(parse_pid, names or ()) if p is not None)
