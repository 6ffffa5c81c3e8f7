"""QMP, QEMU's JSON control protocol (docs/interop/qmp-spec.rst), and
migration of a VM's state to and from a file (QMP ``migrate`` and
``migrate-incoming`` with a file descriptor handed over by ``getfd``).

Every function blocks (call it from a worker thread) and raises
:class:`QmpError` when QMP fails: the socket is gone, a step timed out, or
QEMU answered an error.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from .base import DriverError

__all__ = ["QmpError", "qmp_command", "save_state", "load_state", "start_incoming", "MIGRATE_BANDWIDTH"]

#: Bytes per second a migration to a file may use (QMP ``max-bandwidth``;
#: QEMU's default, 128 MiB/s, would make a 70 MB state take half a second).
MIGRATE_BANDWIDTH = 8 << 30


class QmpError(DriverError):
    """QMP failed: the socket is gone, timed out, or QEMU answered an error."""


def qmp_command(sock_path: Path, command: str, arguments: dict | None = None, timeout: float = 5.0,
                fds: list[int] | None = None) -> object:
    """Run one QMP command on a fresh connection to ``sock_path``: greeting,
    ``qmp_capabilities``, ``command``; returns its ``return`` value.  Events
    are skipped.  ``fds`` go with the command as SCM_RIGHTS ancillary data
    (for ``getfd``).  Blocks at most about ``timeout`` seconds per step."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock_path))
            f = s.makefile("rwb")

            def reply() -> object:
                while True:
                    line = f.readline()
                    if not line:
                        raise QmpError(f"QMP {command}: QEMU closed the connection")
                    msg = json.loads(line)
                    if "return" in msg:
                        return msg["return"]
                    if "error" in msg:
                        raise QmpError(f"QMP {command}: {msg['error'].get('desc', msg['error'])}")

            greeting = json.loads(f.readline() or b"{}")
            if "QMP" not in greeting:
                raise QmpError(f"QMP: no greeting from {sock_path}")
            f.write(b'{"execute":"qmp_capabilities"}\n')
            f.flush()
            reply()
            msg: dict = {"execute": command}
            if arguments:
                msg["arguments"] = arguments
            data = json.dumps(msg).encode() + b"\n"
            if fds:
                socket.send_fds(s, [data], fds)
            else:
                f.write(data)
                f.flush()
            try:
                return reply()
            except QmpError as e:
                if command == "quit" and "closed the connection" in str(e):
                    return {}
                raise
    except (OSError, ValueError) as e:
        raise QmpError(f"QMP {command} on {sock_path}: {e}") from e


def _capabilities(qmp: Path) -> None:
    # x-ignore-shared: RAM in a share=on memory backend is not sent (a boot
    # template's memory file is mapped by its copies instead); without such
    # RAM it changes nothing, and both ends must agree, so every cloudfs
    # migration sets it
    qmp_command(qmp, "migrate-set-capabilities",
                {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})


#: QEMU's default ``downtime-limit`` (ms): the pause its last pass aims at.
#: Set by every save_state (a parameter outlives the migration that set it).
DOWNTIME_MS = 300
#: The largest ``downtime-limit`` QEMU takes (ms): with it, the next pass is
#: the last, whatever is left.
FINISH_DOWNTIME_MS = 2_000_000
#: How near (bytes) what a save with a ``limit`` sent and what it has left
#: may come to that limit before it is finished (save_state).
CONVERGE_HEADROOM = 24 << 20


def save_state(qmp: Path, dest: Path | None, timeout: float = 60.0, fd: int | None = None,
               limit: int | None = None) -> dict:
    """Write the VM's state (devices, and the RAM not in a shared memory
    backend) to the new file ``dest`` (mode 0600) with QMP ``migrate``.  A
    running VM keeps running while its RAM is copied, then pauses for the
    last pass and stays paused (``postmigrate``: the caller sends ``cont``
    to go on); a paused one stays paused.  Returns ``query-migrate``'s
    answer (``downtime`` and ``total-time`` in ms, ``ram.transferred``
    bytes).  QmpError if the migration fails or takes longer than
    ``timeout`` seconds (it is then cancelled: the VM runs on).  Given
    ``fd`` (a socket: a move to another host) instead of ``dest``, the state
    goes there; the caller keeps and closes ``fd``.  ``limit`` (bytes): the
    most RAM it may send (``ram.transferred``, checked every 5 ms, so it
    may pass it by what is sent meanwhile): a guest that rewrites its
    memory faster than it is saved makes each pass send it again.  Once
    what was sent and what is left to send (as of QEMU's last look at the
    dirty pages) come within CONVERGE_HEADROOM of the limit,
    ``downtime-limit`` is raised to FINISH_DOWNTIME_MS, so that QEMU pauses
    the guest for its last pass within its 100 ms bandwidth period (the
    pause is longer, and QEMU resumes the guest if the save fails).  What
    the guest dirties until then is sent too, so the limit is not a hard
    bound on the file: a save that passes it is cancelled, or, if it
    completed meanwhile, refused (QmpError, EAGAIN: the VM runs on)."""
    _capabilities(qmp)
    qmp_command(qmp, "migrate-set-parameters", {"max-bandwidth": MIGRATE_BANDWIDTH, "downtime-limit": DOWNTIME_MS})
    name = dest.name if dest is not None else "the other host"
    if fd is None:
        assert dest is not None
        own = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            qmp_command(qmp, "getfd", {"fdname": "cloudfs-state"}, fds=[own])
        finally:
            os.close(own)
    else:
        qmp_command(qmp, "getfd", {"fdname": "cloudfs-state"}, fds=[fd])
    qmp_command(qmp, "migrate", {"uri": "fd:cloudfs-state"})
    deadline = time.monotonic() + timeout
    finishing = False
    while True:
        got = qmp_command(qmp, "query-migrate")
        status = got.get("status") if isinstance(got, dict) else None
        if status in ("failed", "cancelled", None):
            why = got.get("error-desc", "") if isinstance(got, dict) else ""
            raise QmpError(f"migration to {name} {status or 'gave no status'}" + (f": {why}" if why else ""))
        ram = got.get("ram")
        sent, left = (ram.get("transferred"), ram.get("remaining")) if isinstance(ram, dict) else (None, None)
        if limit is not None and isinstance(sent, int) and sent > limit:
            if status != "completed":
                _cancel(qmp)
            raise QmpError(f"migration to {name} sent {sent >> 20} MiB, more than the {limit >> 20} MiB it may "
                           "(the guest rewrites its memory faster than it is saved); cancelled: try again",
                           errno=errno.EAGAIN)
        if status == "completed":
            return got
        if limit is not None and not finishing and isinstance(sent, int) and isinstance(left, int) \
                and sent + left > limit - CONVERGE_HEADROOM:
            try:
                qmp_command(qmp, "migrate-set-parameters", {"downtime-limit": FINISH_DOWNTIME_MS})
                finishing = True
            except QmpError:
                pass
        if time.monotonic() > deadline:
            _cancel(qmp)
            raise QmpError(f"migration to {name} took more than {timeout:g} s; cancelled")
        time.sleep(0.005)


def _cancel(qmp: Path, wait: float = 2.0) -> None:
    """QMP ``migrate_cancel``, whatever it answers (the migration may have
    just ended), then up to ``wait`` seconds for it to be over, so that
    another migration may start at once."""
    try:
        qmp_command(qmp, "migrate_cancel")
        end = time.monotonic() + wait
        while time.monotonic() < end:
            got = qmp_command(qmp, "query-migrate")
            if not isinstance(got, dict) or got.get("status") in (None, "completed", "failed", "cancelled"):
                return
            time.sleep(0.01)
    except QmpError:
        pass


def start_incoming(qmp: Path, fd: int) -> None:
    """Have a QEMU started with ``-incoming defer`` take a migration
    stream from ``fd`` (a socket; the caller keeps and closes it) without
    waiting for it (QMP ``getfd`` and ``migrate-incoming``)."""
    _capabilities(qmp)
    qmp_command(qmp, "getfd", {"fdname": "cloudfs-state"}, fds=[fd])
    qmp_command(qmp, "migrate-incoming", {"uri": "fd:cloudfs-state"})


def load_state(qmp: Path, src: Path, timeout: float = 60.0) -> None:
    """Load a state written by :func:`save_state` into a QEMU started with
    ``-incoming defer`` and the same machine, memory size and devices
    (QMP ``migrate-incoming``); returns once it is loaded (status
    ``paused``, or ``running`` when the source was running).  QmpError if
    loading fails or takes longer than ``timeout`` seconds."""
    _capabilities(qmp)
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        qmp_command(qmp, "getfd", {"fdname": "cloudfs-state"}, fds=[fd])
    finally:
        os.close(fd)
    qmp_command(qmp, "migrate-incoming", {"uri": "fd:cloudfs-state"})
    deadline = time.monotonic() + timeout
    while True:
        got = qmp_command(qmp, "query-status")
        status = got.get("status") if isinstance(got, dict) else None
        if status in ("paused", "running", "postmigrate"):
            return
        if status != "inmigrate":
            raise QmpError(f"loading {src.name}: QEMU is {status}")
        if time.monotonic() > deadline:
            raise QmpError(f"loading {src.name} took more than {timeout:g} s")
        time.sleep(0.005)
