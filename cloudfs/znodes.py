"""The znode layout of one cloudfs deployment, under a root such as
``/cloudfs/<deployment>`` (tests use a fresh root per test).

::

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
    <root>/pending/<pid>-<seq>       work for the reconciler: the record of
                                     <pid> may differ from the backend
    <root>/owners/<pid>              ephemeral: the daemon (its id as data)
                                     that acts on <pid> for the compute driver

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


class Layout:
    """Znode paths under ``root`` (no trailing slash, e.g. ``/cloudfs/prod``)."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.nextpid = f"{self.root}/nextpid"
        self.proc = f"{self.root}/proc"
        self.pending = f"{self.root}/pending"
        self.owners = f"{self.root}/owners"

    def record(self, pid: int) -> str:
        return f"{self.proc}/{pid}"

    def kids(self, pid: int) -> str:
        return f"{self.proc}/{pid}/kids"

    def kid(self, pid: int, child: int) -> str:
        return f"{self.proc}/{pid}/kids/{child}"

    def userdata(self, pid: int) -> str:
        return f"{self.proc}/{pid}/userdata"

    def env(self, pid: int) -> str:
        return f"{self.proc}/{pid}/env"

    def env_key(self, pid: int, key: str) -> str:
        return f"{self.proc}/{pid}/env/{key}"

    def wait(self, pid: int) -> str:
        return f"{self.proc}/{pid}/wait"

    def wait_prefix(self, pid: int) -> str:
        return f"{self.proc}/{pid}/wait/w-"

    def pending_prefix(self, pid: int) -> str:
        return f"{self.pending}/{pid}-"

    def owner(self, pid: int) -> str:
        return f"{self.owners}/{pid}"

    def process_subtree(self, pid: int) -> list[str]:
        """The fixed znodes of a process, parents first (created by fork)."""
        return [self.record(pid), self.kids(pid), self.userdata(pid), self.env(pid), self.wait(pid)]
