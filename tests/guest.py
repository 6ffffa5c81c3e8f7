"""Boot a "tiny" guest under QEMU and drive its serial-console shell from tests.

:class:`Guest` starts ``qemu-system-x86_64 -accel tcg`` with the kernel and
initramfs of a :class:`cloudfs.guestimage.TinyImage`, kernel argument
``cloudfs.mode=shell`` (the guest's /init then runs a shell on ttyS0), the
serial line on QEMU's stdin/stdout pipes, and user-mode networking with
``restrict=on`` whose only way out is ``guestfwd`` rules from 10.0.2.100:<guest
port> to 127.0.0.1:<host port>.  Nothing else on the network is reachable.

The shell is a non-interactive busybox ``sh`` whose controlling terminal is
ttyS0 (echo and ``\\n``->``\\r\\n`` translation off), with ``trap : INT`` so that
^C (0x03 on the serial line) kills the foreground command through the tty
line discipline but not the shell (termios(3) ISIG; sh(1p) "trap").  Commands
are wrapped in unique marker lines to find their output and ``$?``.

The class is synchronous (a subprocess plus a reader thread); trio tests use
the ``a*`` wrappers, which run it through ``trio.to_thread.run_sync``.

QEMU 7.2 facts that shape this (measured here):

* ``guestfwd=tcp:IP:PORT-tcp:127.0.0.1:HOSTPORT`` (``forward_mode="tcp"``)
  connects to the host port once, when QEMU *starts* (QEMU exits if nothing
  listens); that single connection carries the guest's connection, and a
  host-side close is not passed on to the guest (the guest socket stays
  open).  Good for exactly one long-lived guest connection per boot.
* ``guestfwd=...-cmd:CONNECTOR`` (``forward_mode="cmd"``, the default) runs a
  small Python connector per guest connection that connects to the host
  port then, so every guest connect is one host connection and closes
  propagate both ways, like real TCP.
* ``restrict=on`` keeps guestfwd working and cuts off everything else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import secrets
import shlex
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Iterator, Mapping

from cloudfs.guestimage import TinyImage

__all__ = ["Guest", "GuestError", "GuestTimeout", "Pending", "BackgroundJob", "booted_guest",
           "GUEST_FWD_ADDR", "guestfwd_rule"]

#: The guest-side address of the test guests' guestfwd rules.
GUEST_FWD_ADDR = "10.0.2.100"

#: Run by QEMU (via /bin/sh) per guest connection to a guestfwd address
#: (forward_mode "cmd"): copy between stdin/stdout (QEMU's end of the guest
#: connection) and 127.0.0.1:argv[1], closing each direction when the other
#: side does.  A test harness only: cloudfs's own VMs reach the daemon over
#: their channels (cloudfs.drivers.netns), with no process per connection.
_CONNECTOR = r"""
import os, socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def up():
    while True:
        d = os.read(0, 65536)
        if not d:
            break
        s.sendall(d)
    try:
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
threading.Thread(target=up, daemon=True).start()
while True:
    d = s.recv(65536)
    if not d:
        break
    os.write(1, d)
"""


def guestfwd_rule(guest_port: int, host_port: int) -> str:
    """The ``-netdev user`` option forwarding the guest's connections to
    GUEST_FWD_ADDR:``guest_port`` to 127.0.0.1:``host_port``, each through
    its own connector process.  QEMU option values escape commas by doubling."""
    connector = f"{shlex.quote(sys.executable)} -c {shlex.quote(_CONNECTOR)} {int(host_port)}"
    return f"guestfwd=tcp:{GUEST_FWD_ADDR}:{int(guest_port)}-cmd:{connector.replace(',', ',,')}"


_READY = re.compile(rb"cloudfs-guest: shell ready\r?\n")
_SHELL_EXITED = b"cloudfs-guest: shell exited"
#: N_TTY_BUF_SIZE is 4096: canonical-mode lines longer than this are cut.
_MAX_LINE = 4000


class GuestError(RuntimeError):
    """The guest or QEMU misbehaved (QEMU exited, the shell died, bad command)."""


class GuestTimeout(GuestError, TimeoutError):
    """A wait on the guest console exceeded its timeout (seconds).

    The message ends with the tail of the console output.
    """


@dataclasses.dataclass(frozen=True)
class BackgroundJob:
    """A command started with :meth:`Guest.start`: its guest ``pid`` and ``log`` path.

    ``log`` is the guest path receiving the job's stdout and stderr.
    """

    pid: int
    log: str


class Pending:
    """A foreground command sent with :meth:`Guest.begin`, not yet waited for."""

    def __init__(self, guest: "Guest", token: str):
        self._guest = guest
        self.token = token
        self.result: tuple[int, str] | None = None
        self._begun = False  # start marker seen
        self._start = 0  # console offset where the command's output starts

    def wait(self, timeout: float) -> tuple[int, str]:
        """Wait up to ``timeout`` seconds for the command; return ``(status, output)``.

        ``status`` is the shell's ``$?`` (128+N when killed by signal N, e.g.
        130 after :meth:`Guest.interrupt`); ``output`` its stdout+stderr,
        decoded as UTF-8 with replacement.  Raises GuestTimeout (the command
        keeps running; wait again or interrupt it) or GuestError.
        """
        if self.result is None:
            self.result = self._guest._wait_end(self, timeout)
        return self.result


class Guest:
    """One QEMU guest running the "tiny" image in shell mode.

    ``image``: the TinyImage; ``initramfs`` overrides its initramfs (e.g. one
    made by :func:`cloudfs.guestimage.append_files`).  ``forwards`` maps guest
    ports on 10.0.2.100 to host ports on 127.0.0.1.  ``forward_mode="cmd"``
    (default) connects to the host port anew for each guest connection (if
    nothing listens, the guest's connection is accepted and then closed);
    ``"tcp"`` uses ``guestfwd=...-tcp:127.0.0.1:H``, which needs the host
    port listening before :meth:`boot` and carries one connection per boot
    (see the module docstring).  ``console_log`` receives every byte the guest prints
    (and QEMU's stderr goes to ``<console_log>.qemu-stderr``).  ``memory_mb``
    is the guest RAM in MiB; ``append`` extra kernel arguments.  ``mode`` is
    the ``cloudfs.mode=`` kernel argument: ``"shell"`` (the default) gives the
    command methods below; any other mode (e.g. ``"boot"``: run
    ``/etc/cloudfs/boot`` and power off) only boots, and the test uses
    :meth:`wait_exit` and :meth:`console_text`.

    Use as a context manager (``with Guest(...) as g:``) or call
    :meth:`boot` and :meth:`close`; QEMU is killed on close, on garbage
    collection and at interpreter exit.  Methods are not thread-safe: one
    caller at a time.
    """

    def __init__(self, image: TinyImage, console_log: Path, *,
                 forwards: Mapping[int, int] | None = None, forward_mode: str = "cmd",
                 initramfs: Path | None = None, memory_mb: int = 256, append: str = "",
                 mode: str = "shell", qemu: str = "qemu-system-x86_64"):
        self.image = image
        self.console_log = Path(console_log)
        self.forwards = dict(forwards or {})
        if forward_mode not in ("cmd", "tcp"):
            raise ValueError(f"forward_mode must be 'cmd' or 'tcp', not {forward_mode!r}")
        self.forward_mode = forward_mode
        self.initramfs = Path(initramfs) if initramfs else image.initramfs
        self.memory_mb = memory_mb
        self.mode = mode
        self.append = append
        self.qemu = qemu
        self.proc: subprocess.Popen | None = None
        self._buf = bytearray()
        self._pos = 0  # console bytes before this offset are consumed
        self._cond = threading.Condition()
        self._eof = False
        self._reader: threading.Thread | None = None
        self._pending: Pending | None = None
        self._needs_setup = True
        self._jobs = itertools.count(1)
        self._finalizer: weakref.finalize | None = None

    # -- lifecycle ---------------------------------------------------------

    def argv(self) -> list[str]:
        """The QEMU command line (list of strings) :meth:`boot` runs."""
        netdev = "user,id=n0,restrict=on"
        for gport, hport in sorted(self.forwards.items()):
            if self.forward_mode == "cmd":
                netdev += "," + guestfwd_rule(int(gport), int(hport))
            else:
                netdev += f",guestfwd=tcp:{GUEST_FWD_ADDR}:{int(gport)}-tcp:127.0.0.1:{int(hport)}"
        return [
            self.qemu, "-accel", "tcg", "-m", str(self.memory_mb), "-smp", "1",
            "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", str(self.image.kernel), "-initrd", str(self.initramfs),
            "-append", f"console=ttyS0 cloudfs.mode={self.mode} quiet panic=-1 {self.append}".strip(),
            "-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
            "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0",
        ]

    def boot(self, timeout: float = 90.0) -> "Guest":
        """Start QEMU and wait up to ``timeout`` seconds for the shell; return self.

        Raises GuestTimeout or GuestError (QEMU exited; its stderr is quoted).
        QEMU is killed if booting fails.
        """
        if self.proc is not None:
            raise GuestError("guest already booted")
        self.console_log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.console_log, "wb")
        self._stderr_path = self.console_log.with_name(self.console_log.name + ".qemu-stderr")
        self._stderr = open(self._stderr_path, "wb")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, bufsize=0)
        self._finalizer = weakref.finalize(self, _kill, self.proc)
        self._reader = threading.Thread(target=self._read_loop, name="guest-console", daemon=True)
        self._reader.start()
        if self.mode != "shell":
            return self
        try:
            self._setup(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def wait_exit(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for QEMU to exit; return its exit status.

        The guest powering off (or panicking, with ``panic=-1 -no-reboot``)
        ends QEMU.  Raises GuestTimeout if it is still running.
        """
        if self.proc is None:
            raise GuestError("guest not booted")
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GuestTimeout(f"QEMU still running after {timeout}s{self._tail()}") from None
        if self._reader is not None:
            self._reader.join(timeout=5)
        return rc

    def close(self) -> None:
        """Kill QEMU (SIGKILL; the guest is RAM-only) and close the log files. Idempotent."""
        if self.proc is not None:
            _kill(self.proc)
        if self._reader is not None:
            self._reader.join(timeout=5)
        for f in (getattr(self, "_log", None), getattr(self, "_stderr", None)):
            if f is not None and not f.closed:
                f.close()

    def __enter__(self) -> "Guest":
        return self.boot()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- console -----------------------------------------------------------

    def _read_loop(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self._buf += data
                if not self._log.closed:
                    self._log.write(data)
                    self._log.flush()
                self._cond.notify_all()

    def console_text(self) -> str:
        """Everything the guest printed so far (decoded with replacement)."""
        with self._cond:
            return self._buf.decode(errors="replace")

    def _tail(self, n: int = 1500) -> str:
        with self._cond:
            tail = self._buf[-n:].decode(errors="replace")
        err = ""
        try:
            err = self._stderr_path.read_text(errors="replace")[-1000:]
        except OSError:
            pass
        return f"\n--- console tail ---\n{tail}" + (f"\n--- qemu stderr ---\n{err}" if err else "")

    def _wait_for(self, pattern: re.Pattern[bytes], timeout: float, what: str) -> re.Match[bytes]:
        """Wait for ``pattern`` in unconsumed console output; consume through the match."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = pattern.search(self._buf, self._pos)
                if m:
                    self._pos = m.end()
                    return m
                died = self._buf.find(_SHELL_EXITED, self._pos)
                if died >= 0:
                    self._pos = died + len(_SHELL_EXITED)
                    self._needs_setup = True
                    self._pending = None
                    raise GuestError(f"guest shell exited while waiting for {what}{self._tail()}")
                if self._eof:
                    raise GuestError(f"QEMU exited (status {self.proc.poll() if self.proc else None}) "
                                     f"while waiting for {what}{self._tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestTimeout(f"timed out after {timeout}s waiting for {what}{self._tail()}")
                self._cond.wait(min(left, 1.0))

    def _write(self, data: bytes) -> None:
        if self.proc is None or self.proc.stdin is None:
            raise GuestError("guest not booted")
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as e:
            raise GuestError(f"QEMU's console is closed: {e}{self._tail()}") from e

    def _setup(self, timeout: float) -> None:
        """Wait for the shell banner and arm the SIGINT trap."""
        self._wait_for(_READY, timeout, "the guest shell")
        self._needs_setup = False
        self.run("trap : INT", timeout=30)

    # -- commands ----------------------------------------------------------

    def begin(self, cmd: str, tty_stdin: bool = False) -> Pending:
        """Send ``cmd`` to the guest shell to run in the foreground; don't wait.

        ``cmd`` is sh(1p) text, possibly several lines (each under 4000 bytes:
        the tty's canonical-mode line limit); it runs in the shell itself, so
        ``cd`` and variables persist.  Its stdin is /dev/null unless
        ``tty_stdin`` is true: then it reads the serial line, and the test
        feeds it with :meth:`send`.  Returns a :class:`Pending`; only one may
        be outstanding.  Raises GuestError if another command is pending or a
        line is too long.
        """
        if self._pending is not None:
            raise GuestError(f"command {self._pending.token} still pending; wait for it first")
        if self._needs_setup:
            self._setup(60)
        for line in cmd.split("\n"):
            if len(line.encode()) > _MAX_LINE:
                raise GuestError(f"command line over {_MAX_LINE} bytes (tty canonical-mode limit)")
        token = secrets.token_hex(6)
        # One compound command: the shell parses it entirely before running it,
        # so ^C's input flush cannot drop the end marker.  The markers are built
        # by printf so the command text never contains them literally.
        redirect = "" if tty_stdin else " </dev/null"
        wrapped = (f"printf '__CFS_%s_B__\\n' {token}; {{ {cmd}\n}}{redirect}; "
                   f"printf '\\n__CFS_%s_E__ %d\\n' {token} \"$?\"\n")
        self._pending = Pending(self, token)
        self._write(wrapped.encode())
        return self._pending

    def _wait_end(self, pending: Pending, timeout: float) -> tuple[int, str]:
        tok = pending.token.encode()
        end = re.compile(rb"\n__CFS_" + tok + rb"_E__ (\d+)\n")
        deadline = time.monotonic() + timeout
        self.wait_started(pending, timeout)
        m = self._wait_for(end, max(0.0, deadline - time.monotonic()),
                           f"end of command {pending.token}")
        with self._cond:
            out = bytes(self._buf[pending._start:m.start()])
        if self._pending is pending:
            self._pending = None
        return int(m.group(1)), out.decode(errors="replace")

    def wait_started(self, pending: Pending, timeout: float = 30.0) -> None:
        """Wait until the shell has begun running ``pending`` (its start marker printed).

        Raises GuestTimeout after ``timeout`` seconds, GuestError if QEMU or the shell died.
        """
        if not pending._begun:
            tok = pending.token.encode()
            m = self._wait_for(re.compile(rb"__CFS_" + tok + rb"_B__\n"), timeout,
                               f"start of command {pending.token}")
            pending._begun = True
            pending._start = m.end()

    def run(self, cmd: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run ``cmd`` in the guest shell; return ``(exit status, stdout+stderr)``.

        See :meth:`begin` for what ``cmd`` may be and :meth:`Pending.wait`
        for the result and errors.  On GuestTimeout the command is
        interrupted with ^C before the error is raised.
        """
        p = self.begin(cmd)
        try:
            return p.wait(timeout)
        except GuestTimeout:
            self.interrupt()
            try:
                p.wait(10)
            except GuestError:
                # Give up on this command; its unique end marker is ignored if it comes.
                if self._pending is p:
                    self._pending = None
            raise

    def check(self, cmd: str, timeout: float = 30.0) -> str:
        """Like :meth:`run` but return only the output; GuestError unless status is 0."""
        status, out = self.run(cmd, timeout)
        if status != 0:
            raise GuestError(f"guest command {cmd!r} exited {status}: {out}")
        return out

    def start(self, cmd: str) -> BackgroundJob:
        """Start ``cmd`` in the background of the guest shell; return its pid and log.

        Its stdout+stderr go to the guest file ``/tmp/cloudfs-job<N>.log`` (so
        they never mix with console markers) and stdin is /dev/null.  Like
        any background job of a shell without job control it ignores SIGINT,
        so :meth:`interrupt` does not reach it; stop it with ``kill <pid>``.
        """
        log = f"/tmp/cloudfs-job{next(self._jobs)}.log"
        out = self.check(f"( {cmd}\n) >{log} 2>&1 </dev/null & echo $!")
        return BackgroundJob(pid=int(out.strip().splitlines()[-1]), log=log)

    def send(self, data: str | bytes) -> None:
        """Write ``data`` raw to the serial line (input for a ``tty_stdin`` command).

        The tty is in canonical mode: a program sees a line when ``\\n`` is sent.
        """
        self._write(data.encode() if isinstance(data, str) else data)

    def interrupt(self) -> None:
        """Send ^C (byte 0x03) on the serial line: SIGINT to the foreground command."""
        self._write(b"\x03")

    # -- trio --------------------------------------------------------------

    async def arun(self, cmd: str, timeout: float = 30.0) -> tuple[int, str]:
        """:meth:`run` from trio, in a worker thread (abandoned on cancellation)."""
        import trio
        return await trio.to_thread.run_sync(self.run, cmd, timeout, abandon_on_cancel=True)

    async def await_pending(self, pending: Pending, timeout: float) -> tuple[int, str]:
        """:meth:`Pending.wait` from trio, in a worker thread."""
        import trio
        return await trio.to_thread.run_sync(pending.wait, timeout, abandon_on_cancel=True)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` if still running and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)
    for f in (proc.stdin, proc.stdout):
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()


@contextlib.contextmanager
def booted_guest(image: TinyImage, console_log: Path, **kwargs) -> Iterator[Guest]:
    """Context manager: a booted :class:`Guest` (kwargs as for Guest), killed on exit."""
    g = Guest(image, console_log, **kwargs)
    try:
        g.boot()
        yield g
    finally:
        g.close()

