"""Moving a QEMU VM to another host's daemon: ``echo migrate HOST > ctl``.

A QEMU VM runs in a network namespace of its own and reaches nothing, so
the daemons carry the migration stream (QEMU live migration, docs
``migration.rst``) between them, over TCP, and ZooKeeper decides who holds
the VM at the end.  The source daemon ``S`` owns the process; the daemon
``D`` on the host named in ``/hosts`` takes VMs at its ``--migrate-listen``
address (its ``/hosts`` entry's ``migrate``):

1. S writes ``moves/<pid>`` (ephemeral: it goes with S's session) naming D's
   host and a random token, and connects to D.
2. S sends one JSON line: protocol version (``v``, PROTOCOL), pid, token,
   image, flavor, accelerator, name.  D checks it against ``moves/<pid>``
   (the token, its own host name), starts a paused QEMU for the pid
   (``-incoming``, ``-S``; its directory marked *incoming*), answers
   ``ready 2`` (the protocol version: S goes on only if it is its own).
3. S's QEMU migrates into a socket pair whose other end S relays to the TCP
   connection as ``M`` frames; D relays them into its QEMU's socket pair.
   When QEMU is done the source is paused (``postmigrate``) and its scratch
   disk no longer changes: S sends what the guest wrote on it (its data
   extents, cloudfs.drivers.extents, less what reads as zeros) as ``D``
   frames, which D writes into its copy's fresh scratch disk, then ``E``.
   D waits until the state is loaded and answers ``loaded <id>``; the copy
   waits paused.  Frames::

       M len[4] data[len]               migration stream (len <= CHUNK)
       D offset[8] len[4] data[len]     scratch disk bytes (len <= DISK_CHUNK)
       E                                the end

   (little-endian).  The disk is copied while the VM is paused, so the
   pause grows with what the guest wrote (bench/results/migrate.json); the
   ``move`` line's ``paused N ms`` is QEMU's downtime plus the time from
   QEMU's end to ``loaded`` (at least the pause: the commit and the copy's
   ``cont`` come after it).  D checks each frame before it reads its data,
   and, before it writes each ``D`` frame, that its QEMU still runs: one
   that could not load the state ends, and the move is refused then, not
   after ``E``.
4. The commit is one compare-and-set of the process record: its VM, host
   and scope become D's (state as desired, ``move`` says ``from A to B at
   T``).  Then S deletes ``moves/<pid>`` and ends its copy; ownership passes
   to D like any takeover (S disowns the pid; D takes ``owners/<pid>``).
5. D waits for ``moves/<pid>`` to go, then reads the record: if it names
   D's copy, D marks it as its VM and lets it run; if not (S gave up, or
   died before the commit), D ends the copy.

Before the commit the record names S's VM, and S resumes it if anything
fails (the move's ``move`` then says why); after it, the record names D's,
which D runs even if S dies.  So there is always one VM to run, and never
two running: the copy waits paused until the record is D's, and the source
stays paused once its state went.  A daemon restarted mid-move finds its
copies marked *incoming* and settles them the same way (:meth:`Moves.recover`).

Bounds: a daemon takes MAX_INCOMING moves at once (more are refused), the
JSON line is at most HEADER_MAX bytes and must come within HEADER_TIMEOUT
seconds, the migration stream at most the VM's RAM plus STREAM_SLACK bytes,
disk frames only within the copy's scratch disk and at most its size in
all, the whole transfer at most MOVE_TIMEOUT seconds; a move's buffers hold
at most about 3 × DISK_CHUNK + 2 × CHUNK + HEADER_MAX bytes (3.2 MiB: the
data of a frame being written, and the next one read).  Anything else (an
unknown frame, a frame too long, disk data out of range, another protocol
version) is refused with ``failed <why>`` and the copy removed.  The
sender trusts the other daemon's answers no further: it shows what it says
in ``move`` as printable text (at most 200 bytes, what is not printable
as ``?``), takes only a VM id (cloudfs.drivers.qemu.SERVER_ID) as its copy's,
and resumes its VM whatever the other daemon does (tests/cloudfs/test_moves.py).

The guest's 9P connection does not survive a move (user-mode networking
keeps no TCP state): the guest's ``cloudfs-watch`` notices that its fw_cfg
``gen`` changed and mounts ``/cloud`` again (cloudfs.drivers.qemu).
"""

from __future__ import annotations

import errno
import hmac
import json
import logging
import os
import secrets
import select
import socket
import struct

import trio

from ninep.dial import parse_dial
from ninep.errors import FsError

from . import decisions as d
from .drivers.base import DriverError, NotFound, Server
from .drivers.extents import copy_ranges
from .drivers.qemu import FLAVORS, SERVER_ID, STATE_SLACK, QemuDriver
from .hosts import Hosts
from .procdata import ProcData
from .process import Desired, now_iso
from .records import Records
from .store import BadVersionError, NodeExistsError, NoNodeError, Store, Unreachable
from .znodes import Layout

log = logging.getLogger(__name__)

__all__ = ["Moves", "MAX_INCOMING", "MOVE_TIMEOUT"]

#: Moves a daemon takes at once; more are refused (``failed busy``).
MAX_INCOMING = 2
#: The JSON line's size (bytes) and the seconds it may take to come.
HEADER_MAX = 4096
HEADER_TIMEOUT = 10.0
#: Seconds for connecting, and for a whole transfer (connect to loaded).
CONNECT_TIMEOUT = 10.0
MOVE_TIMEOUT = 120.0
#: Bytes a migration stream may hold beyond the VM's RAM (device state).
STREAM_SLACK = STATE_SLACK
#: Relay buffer (bytes): the most data one ``M`` frame carries.
CHUNK = 1 << 16
#: The most data one ``D`` frame carries (bytes).
DISK_CHUNK = 1 << 20
#: Data extents of the scratch disk less than this many bytes apart are
#: read and sent as one (a frame and a read per small extent saved).
DISK_GAP = 1 << 16
#: The version of the move protocol (the request's ``v``, the ``ready``
#: answer's); both ends must speak it.
PROTOCOL = 2
READY = b"ready %d\n" % PROTOCOL
_ZEROS = bytes(DISK_CHUNK)
_M = struct.Struct("<cI")   # b"M", len
_D = struct.Struct("<cQI")  # b"D", offset, len


class MoveFailed(FsError):
    """A move did not happen; the VM stays where it was (EIO, or the
    errno of what refused it)."""


async def _line(stream: trio.abc.ReceiveStream, buf: bytearray, limit: int = HEADER_MAX) -> bytes:
    """One ``\\n``-terminated line from ``stream`` (``buf`` keeps what came
    after it); MoveFailed if it is longer than ``limit`` or the stream ends."""
    while b"\n" not in buf:
        if len(buf) > limit:
            raise MoveFailed(errno.EPROTO, "move: line too long")
        more = await stream.receive_some(CHUNK)
        if not more:
            raise MoveFailed(errno.EPROTO, "move: the other daemon closed the connection")
        buf += more
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line


class Moves:
    """Both sides of moving QEMU VMs between the daemons of a deployment
    (module docstring).  ``listen`` the dial string this daemon takes moves
    at (``""``: none; it may still send)."""

    def __init__(self, store: Store, layout: Layout, records: Records, data: ProcData, hosts: Hosts,
                 driver: QemuDriver, take_owner, listen: str = ""):
        self.store, self.layout, self.records, self.data = store, layout, records, data
        self.hosts, self.driver = hosts, driver
        self.take_owner = take_owner  # async (pid) -> bool: the reconciler's Owners.take
        self.listen = listen
        self._incoming = trio.CapacityLimiter(MAX_INCOMING)
        self._nursery: trio.Nursery | None = None

    # -- the source -------------------------------------------------------------------

    async def move(self, pid: int, vm: str, host: str) -> None:
        """Move ``pid``'s VM ``vm`` to the daemon of ``host`` and record
        the outcome (moved, or failed with the VM where it was)."""
        try:
            target = await self.hosts.get(host)
            if target.driver != "qemu" or not target.migrate:
                raise MoveFailed(errno.EOPNOTSUPP, f"host {host} takes no VMs")
            if target.scope == self.driver.scope:
                raise MoveFailed(errno.EINVAL, f"the VM is on host {host} already")
            left = await self.store.exists(self.layout.move(pid))
            cid = self.store.client.client_id
            if left is not None and (cid is None or left.ephemeralOwner != cid[0]):
                # an earlier run's move: the other daemon decides when it goes, and so do we (sweep);
                # this move is tried again at the next look
                log.info("pid %d: an earlier move of %s is still being settled", pid, vm)
                return
            await self.store.sync(self.layout.record(pid))
            if (await self.records.require(pid)).value.vm != vm:
                return  # it moved meanwhile: the next look sees it
            # a VM left paused by a move of ours cut short (the record names it: that move did not land)
            await trio.to_thread.run_sync(self.driver.resume_left, vm)
            spec = await self.driver.move_spec(vm)
            if not spec["running"]:
                raise MoveFailed(errno.EBUSY, "the VM is not running")
        except FsError as e:
            await self._failed(pid, vm, host, e)
            return
        token = secrets.token_hex(16)
        path = self.layout.move(pid)
        doc = json.dumps({"to": host, "token": token, "vm": vm}).encode()
        try:
            try:
                await self.store.create(path, doc, ephemeral=True)
            except NodeExistsError:  # our own, from an attempt cut short
                await self.store.delete(path)
                await self.store.create(path, doc, ephemeral=True)
            st = await self.store.exists(path)
            if st is None:
                raise MoveFailed(errno.EAGAIN, "the move's znode went at once")
            version = st.version
            rec = (await self.records.require(pid)).value
            await trio.to_thread.run_sync(self.driver.mark_moving, vm)
        except FsError as e:
            with trio.CancelScope(shield=True):
                await self._delete(path)
            await self._failed(pid, vm, host, e)
            return
        landed: bool | None = False
        try:
            with trio.fail_after(MOVE_TIMEOUT):
                copy, stats = await self._send(pid, rec.ppid, vm, target.migrate, token, spec)
            server = Server(copy, rec.name, "running", host, tuple(rec.addresses))
            with trio.CancelScope(shield=True):  # once sent, the commit's outcome must be known
                landed = await self._commit(pid, vm, server, target.scope, path, version, stats.get("paused"))
        except BaseException as e:
            with trio.CancelScope(shield=True):
                await self._give_up(pid, vm, host, path, _leaf(e))
            if not isinstance(e, Exception):
                raise
            return
        with trio.CancelScope(shield=True):
            if landed is None:  # ZooKeeper did not tell: settled in the background once it does
                log.error("pid %d: cannot tell yet whether the move of %s to %s was recorded; the VM stays "
                          "paused until ZooKeeper says", pid, vm, host)
                self._later(self._resolve, pid, vm, host, path, "ZooKeeper did not answer the commit")
                return
            if not landed:
                await self._give_up(pid, vm, host, path, MoveFailed(errno.EAGAIN, "the move was not recorded"))
                return
            log.info("moved pid %d from %s to %s (%s); paused %s ms (QEMU's downtime %s ms), %s bytes of RAM, "
                     "%s of disk", pid, vm, host, copy, stats.get("paused"), stats.get("downtime"),
                     stats.get("ram", {}).get("transferred"), stats.get("disk"))
            await self._delete(path)
            try:
                await trio.to_thread.run_sync(self.driver.end_moved, vm)
            except (DriverError, OSError) as e:
                log.warning("pid %d moved; ending the copy left here (%s): %s", pid, vm, e)

    def _later(self, fn, *args) -> None:
        """Run ``fn(*args)`` in the background (it retries until done)."""
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    async def _resolve(self, pid: int, vm: str, host: str, path: str, why: str) -> None:
        """Settle a move whose outcome, or whose failure, ZooKeeper has not
        confirmed: once it answers (after a sync), if the record names
        another VM the move landed (end ``vm`` here), else record the
        failure (which fences a late commit) and resume ``vm``; then
        ``moves/<pid>`` goes.  Tries until it is done."""
        delay = 0.5
        while True:
            try:
                await self.store.wait_connected()
                await self.store.sync(self.layout.record(pid))
                rec = await self.records.get(pid)
                if rec is None or rec.value.vm != vm:
                    await trio.to_thread.run_sync(self.driver.end_moved, vm)
                else:
                    try:
                        await self.records.update(pid, lambda now: d.move_failed(now, vm, host, why))
                    except d.Superseded:
                        continue  # it changed meanwhile: look again
                    await trio.to_thread.run_sync(self.driver.resume, vm)
                await self._delete(path, retry=True)
                log.info("pid %d: the move of %s to %s is settled", pid, vm, host)
                return
            except Exception as e:
                log.warning("pid %d: settling the move of %s: %s; trying again", pid, vm,
                            getattr(e, "message", None) or e)
                await trio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _send(self, pid: int, ppid: int, vm: str, dial: str, token: str, spec: dict) -> tuple[str, dict]:
        """Steps 2–3 (module docstring): the copy's id on the other host,
        and the migration's statistics."""
        try:
            where = parse_dial(dial)
        except ValueError as e:
            raise MoveFailed(errno.EINVAL, f"the other daemon's move address: {e}") from None
        if where.net != "tcp":
            raise MoveFailed(errno.EINVAL, f"the other daemon's move address {dial!r} is not tcp")
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await trio.open_tcp_stream(where.host, where.port)
        async with stream:
            header = {"v": PROTOCOL, "pid": pid, "ppid": ppid, "token": token, **spec}
            await stream.send_all(json.dumps(header).encode() + b"\n")
            buf = bytearray()
            answer = await _line(stream, buf)
            if answer + b"\n" != READY:
                raise MoveFailed(errno.EIO, "the other daemon refused: " + _printable(answer))
            stats: dict = {}
            try:
                await self._stream_out(stream, vm, stats)
                done = trio.current_time()  # QEMU is done: the VM is paused from here on
                stats["disk"] = await self._send_disk(stream, vm)
                await stream.send_all(b"E")
            except BaseException as e:
                if not _hung_up(e):
                    raise
                # The other daemon refused something and hung up: its reason
                # (a ``failed`` line) may have come before the reset.
                why = None
                with trio.move_on_after(2):
                    try:
                        why = await _line(stream, buf)
                    except (MoveFailed, trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                if why is None:
                    cut = next(x for x in _leaves(e) if isinstance(x, _HANG_UPS))
                    raise MoveFailed(errno.EIO, "the other daemon hung up mid-move "
                                                f"({str(cut) or type(cut).__name__})") from None
                raise MoveFailed(errno.EIO, "the other daemon refused: " + _printable(why)) from None
            answer = await _line(stream, buf)
            if isinstance(stats.get("downtime"), int):
                # QEMU's own downtime counts only its last round; the disk
                # copy and the load come after it, with the VM still paused.
                stats["paused"] = stats["downtime"] + round((trio.current_time() - done) * 1000)
            if not answer.startswith(b"loaded "):
                raise MoveFailed(errno.EIO, "the other daemon could not load the VM: " + _printable(answer))
            copy = answer[len(b"loaded "):].decode(errors="replace").strip()
            if not SERVER_ID.fullmatch(copy):
                raise MoveFailed(errno.EIO, "the other daemon named its copy "
                                 + _printable(answer[len(b"loaded "):], 40) + ", which is no VM id")
            return copy, stats

    async def _stream_out(self, stream: trio.SocketStream, vm: str, stats: dict) -> None:
        """QEMU migrates ``vm`` into a socket pair whose other end is relayed
        to ``stream`` as ``M`` frames; ``stats`` gets QEMU's statistics.
        Returns when QEMU is done (the VM paused)."""
        mine, theirs = socket.socketpair()
        try:
            async def migrate():
                try:
                    stats.update(await trio.to_thread.run_sync(self.driver.migrate_out, vm, theirs.fileno()))
                finally:
                    theirs.close()  # QEMU holds its own copy until the migration ends

            async def relay(source: trio.socket.SocketType):
                try:
                    while True:
                        chunk = await source.recv(CHUNK)
                        if not chunk:
                            break
                        await stream.send_all(_M.pack(b"M", len(chunk)) + chunk)
                except BaseException:
                    source.close()  # QEMU's next write fails: the migration ends, the VM runs on
                    raise

            async with trio.open_nursery() as n:
                n.start_soon(migrate)
                n.start_soon(relay, trio.socket.from_stdlib_socket(mine))
        finally:
            mine.close()
            theirs.close()

    async def _send_disk(self, stream: trio.SocketStream, vm: str) -> int:
        """Send what the guest of ``vm`` (paused now) wrote on its scratch
        disk as ``D`` frames; the bytes sent."""
        fd, extents = await trio.to_thread.run_sync(self.driver.scratch_out, vm)
        sent = 0
        try:
            for off, n in copy_ranges(extents, DISK_CHUNK, DISK_GAP):
                data = await trio.to_thread.run_sync(os.pread, fd, n, off)
                if len(data) != n:
                    raise MoveFailed(errno.EIO, "the scratch disk shrank while it was sent")
                if data == _ZEROS[:n]:
                    continue  # the copy's fresh disk reads zeros there already
                await stream.send_all(_D.pack(b"D", off, n) + data)
                sent += n
        finally:
            os.close(fd)
        return sent

    async def _commit(self, pid: int, vm: str, server: Server, scope: str, path: str, version: int,
                      downtime: object = None) -> bool | None:
        """Step 4: one multi writes the record naming the copy if
        ``moves/<pid>`` is still the one this daemon made (so a session lost
        mid-move, whose ephemeral znode went, cannot commit behind the other
        daemon's back).  True if it landed, False if not (raises
        d.Superseded when the process is being killed), None if ZooKeeper
        did not say within MOVE_TIMEOUT seconds."""
        at = now_iso() + (f" (paused {downtime} ms)" if isinstance(downtime, int) else "")
        L = self.layout
        with trio.move_on_after(MOVE_TIMEOUT):
            while True:
                try:
                    cur = await self.records.require(pid)
                    new = d.moved(cur.value, vm, server, scope, at)
                    t = self.store.transaction()
                    t.check(path, version)
                    t.set_data(L.record(pid), new.to_json(), cur.version)
                    try:
                        await self.store.commit(t)
                        return True
                    except BadVersionError:
                        if await self.store.exists(path) is None:
                            return False
                        continue  # the record changed meanwhile: again
                    except NoNodeError:
                        return False  # the move's znode (or the process) is gone
                except Unreachable:
                    pass
                # the answer was lost: after a sync, the record says
                try:
                    await self.store.wait_connected()
                    await self.store.sync(L.record(pid))
                    now = await self.records.get(pid)
                    if now is None:
                        return False
                    if now.value.vm == server.id:
                        return True
                    if await self.store.exists(path) is None:
                        return False
                except Unreachable:
                    await trio.sleep(0.5)
        return None

    async def _give_up(self, pid: int, vm: str, host: str, path: str, e: BaseException) -> None:
        """The move did not happen (or cannot have: the record still names
        ``vm``): record why, resume the VM here, and let the other daemon
        end its copy (``moves/<pid>`` goes).  The failure is recorded first
        and only while the record names ``vm``: a late commit is fenced, and
        a VM whose record names the copy is never resumed (it is ended).
        What cannot be done now is done in the background (:meth:`_resolve`)."""
        why = e if isinstance(e, FsError) else \
            MoveFailed(errno.EAGAIN, f"took more than {MOVE_TIMEOUT:g} s") if isinstance(e, trio.TooSlowError) \
            else MoveFailed(errno.EIO, str(e) or type(e).__name__)
        log.warning("pid %d: moving %s to %s failed: %s", pid, vm, host, why.message)
        try:
            try:
                rec = await self.records.update(pid, lambda now: d.move_failed(now, vm, host, why.message))
                ours = rec.value.vm == vm
            except d.Superseded as s:
                ours = s.record.vm == vm  # killed meanwhile: the kill ends it here
            if ours:
                await trio.to_thread.run_sync(self.driver.resume, vm)
            else:  # the move landed after all: the copy is the VM
                await trio.to_thread.run_sync(self.driver.end_moved, vm)
            await self._delete(path, retry=True)
        except Exception as err:
            log.warning("pid %d: giving up the move of %s: %s; settling it in the background", pid, vm,
                        getattr(err, "message", None) or err)
            self._later(self._resolve, pid, vm, host, path, why.message)

    async def _delete(self, path: str, retry: bool = False) -> None:
        """Delete ``moves/<pid>``; if ZooKeeper cannot now and ``retry``,
        keep trying in the background (the other daemon's copy waits for it)."""
        try:
            await self.store.delete(path)
        except NoNodeError:
            pass
        except FsError:
            if retry:
                self._later(self._delete_until_gone, path)

    async def _delete_until_gone(self, path: str) -> None:
        delay = 0.5
        while True:
            try:
                await self.store.delete(path)
                return
            except NoNodeError:
                return
            except Exception:
                await trio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _failed(self, pid: int, vm: str, host: str, e: FsError) -> None:
        log.warning("pid %d: moving %s to %s failed: %s", pid, vm, host, e.message)
        try:
            await self.records.update(pid, lambda now: d.move_failed(now, vm, host, e.message))
        except (d.Superseded, FsError):
            pass

    async def sweep(self) -> None:
        """Settle the VMs here that a move of an earlier run of this daemon
        left paused (:meth:`_settle_left`, one task each)."""
        try:
            mine = await trio.to_thread.run_sync(self.driver.local_vms)
        except OSError as e:
            log.warning("listing VMs: %s", e)
            return
        for vm, pid in mine:
            self._later(self._settle_left, vm, pid)

    async def _settle_left(self, vm: str, pid: int) -> None:
        """Once no earlier run's ``moves/<pid>`` remains (the other daemon
        decides by the record when it goes, and so do we) and after a sync:
        end ``vm`` if its process moved to another host's VM, resume it if
        a move of ours left it paused and the record names it."""
        path = self.layout.move(pid)
        delay = 0.5
        while True:
            try:
                with self.store.watching(path) as ev:
                    left = await self.store.exists(path, watch=True)
                    cid = self.store.client.client_id
                    if left is not None and (cid is None or left.ephemeralOwner != cid[0]):
                        await ev.wait()
                        continue
                await self.store.sync(self.layout.record(pid))
                rec = await self.records.get(pid)
                if rec is not None and rec.value.vm not in (None, vm) and \
                        rec.value.scope not in ("", self.driver.scope):
                    log.warning("pid %d moved to %s; ending its old VM %s here", pid, rec.value.host, vm)
                    await trio.to_thread.run_sync(self.driver.end_moved, vm)
                elif rec is not None and rec.value.vm == vm:
                    await trio.to_thread.run_sync(self.driver.resume_left, vm)
                return
            except Unreachable:
                await self.store.wait_connected()
            except NotFound:
                return
            except Exception as e:  # one VM's trouble is not the daemon's
                log.warning("settling %s (pid %d) after a restart: %s; trying again", vm, pid,
                            getattr(e, "message", None) or e)
                await trio.sleep(delay)
                delay = min(delay * 2, 30.0)

    # -- the destination -----------------------------------------------------------------

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled: settle what an earlier run left (:meth:`sweep`,
        :meth:`recover`), and take moves at :attr:`listen` (a
        ``tcp!addr!port`` dial string; none if empty)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.sweep)
            nursery.start_soon(self.recover)
            if not self.listen:
                task_status.started()
                return
            where = parse_dial(self.listen)
            if where.net != "tcp":
                raise ValueError(f"--migrate-listen must be tcp!ADDR!PORT, not {self.listen!r}")
            listeners = await trio.open_tcp_listeners(where.port, host=None if where.host == "*" else where.host)
            task_status.started()
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                self._incoming.acquire_nowait()
            except trio.WouldBlock:
                await _reply(stream, b"failed busy: too many moves at once")
                return
            try:
                await self._take(stream)
            except Exception as e:  # a hostile or broken peer never takes the daemon down
                log.info("refused a move: %s", getattr(e, "message", None) or e)
                await _reply(stream, b"failed " + str(getattr(e, "message", e)).encode()[:200])
            finally:
                self._incoming.release()

    async def _take(self, stream: trio.SocketStream) -> None:
        buf = bytearray()
        with trio.fail_after(HEADER_TIMEOUT):
            raw = await _line(stream, buf)
        try:
            h = json.loads(raw)
            if not isinstance(h, dict):
                raise ValueError("not an object")
            if h.get("v") != PROTOCOL:
                raise MoveFailed(errno.EPROTO, f"move protocol {str(h.get('v'))[:20]} not spoken here "
                                               f"(this daemon speaks {PROTOCOL})")
            pid, ppid, token = h["pid"], h["ppid"], h["token"]
            spec = {k: h[k] for k in ("image", "flavor", "accel", "name")}
            if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (pid, ppid)) \
                    or not isinstance(token, str) or not all(isinstance(v, str) for v in spec.values()):
                raise ValueError("fields of the wrong type")
        except (ValueError, KeyError, TypeError) as e:
            raise MoveFailed(errno.EPROTO, f"not a move request: {e}") from None
        got = await self.store.get(self.layout.move(pid))
        try:
            move = json.loads(got[0]) if got is not None else {}
        except ValueError:
            move = {}
        if not isinstance(move, dict) or move.get("to") != self.hosts.me.name \
                or not hmac.compare_digest(str(move.get("token", "")).encode(errors="replace"),
                                           token.encode(errors="replace")):
            raise MoveFailed(errno.EACCES, f"no move of process {pid} to this host")
        userdata = await self.data.userdata(pid)
        mine, theirs = socket.socketpair()
        copy = None
        disk = -1
        qemu: int | None = None  # a pidfd of the copy's QEMU (_pidfd_of)
        try:
            copy = await trio.to_thread.run_sync(self.driver.incoming_start, pid, ppid, spec, userdata,
                                                 theirs.fileno())
            theirs.close()
            await stream.send_all(READY)
            limit = (FLAVORS[spec["flavor"]][0] << 20) + STREAM_SLACK
            sink = trio.socket.from_stdlib_socket(mine)
            with trio.fail_after(MOVE_TIMEOUT):
                total = 0
                while (kind := await _exactly(stream, buf, 1)) == b"M":
                    _, n = _M.unpack(kind + await _exactly(stream, buf, _M.size - 1))
                    total += n
                    if not 0 < n <= CHUNK:
                        raise MoveFailed(errno.EPROTO, f"move: a frame of {n} bytes")
                    if total > limit:
                        raise MoveFailed(errno.EFBIG, f"the stream passed {limit} bytes")
                    await _send_all(sink, await _exactly(stream, buf, n))
                mine.shutdown(socket.SHUT_WR)  # the end of the migration stream
                disk, size = await trio.to_thread.run_sync(self.driver.scratch_in, copy)
                qemu = await trio.to_thread.run_sync(lambda: _pidfd_of(self.driver.qemu_pid(copy)))
                if qemu is None:
                    log.info("pid %d: cannot watch the moved copy %s (pidfd_open failed): a state it "
                             "cannot load is found out after the disk data", pid, copy)
                written = 0
                while kind == b"D":
                    _, off, n = _D.unpack(kind + await _exactly(stream, buf, _D.size - 1))
                    written += n
                    if not 0 < n <= DISK_CHUNK or off + n > size or written > size:
                        raise MoveFailed(errno.EPROTO, f"move: disk data of {n} bytes at {off} "
                                                       f"(the disk has {size}, {written} so far)")
                    if _ended(qemu):  # it could not load the state: no use taking the rest
                        raise MoveFailed(errno.EIO, "loading the moved VM failed: its QEMU ended")
                    data = await _exactly(stream, buf, n)
                    await trio.to_thread.run_sync(_pwrite_all, disk, data, off)
                    del data  # not held while the next frame is read (the buffer bound)
                    kind = await _exactly(stream, buf, 1)
                if kind != b"E":
                    raise MoveFailed(errno.EPROTO, f"move: unknown frame {kind!r}")
                await trio.to_thread.run_sync(self.driver.incoming_wait, copy)
        except BaseException:
            mine.close()
            theirs.close()
            if disk >= 0:  # before the abort: the last descriptor of a removed file frees its blocks
                doomed, disk = disk, -1
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(os.close, doomed)
            if copy is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.driver.incoming_abort, copy)
            raise
        finally:
            if disk >= 0:
                os.close(disk)
            if qemu is not None and qemu >= 0:
                os.close(qemu)
        mine.close()
        assert self._nursery is not None
        self._nursery.start_soon(self._settle, pid, copy)  # whatever becomes of the answer
        await stream.send_all(f"loaded {copy}\n".encode())

    async def _settle(self, pid: int, copy: str) -> None:
        """Step 5: once ``moves/<pid>`` is gone, keep ``copy`` if the record
        names it, else end it.  Trouble (ZooKeeper, the driver) is logged
        and the step tried again: the copy is never left undecided."""
        path = self.layout.move(pid)
        delay = 0.5
        while True:
            try:
                with self.store.watching(path) as ev:
                    if await self.store.exists(path, watch=True) is not None:
                        await ev.wait()
                        continue
                rec = await self.records.get(pid)
                if rec is not None and rec.value.vm == copy:
                    await self.driver.incoming_commit(copy, rec.value.desired is not Desired.STOPPED)
                    log.info("pid %d moved here: %s runs", pid, copy)
                    await self.take_owner(pid)
                else:
                    await trio.to_thread.run_sync(self.driver.incoming_abort, copy)
                    log.info("pid %d's move here was given up: %s ended", pid, copy)
                return
            except Unreachable:
                await self.store.wait_connected()
            except NotFound:
                log.info("pid %d: the moved copy %s is gone", pid, copy)
                return
            except Exception as e:
                log.warning("pid %d: settling the moved copy %s: %s; trying again", pid, copy,
                            getattr(e, "message", None) or e)
                await trio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def recover(self) -> None:
        """Settle the copies an earlier run of this daemon took but did
        not settle (it was killed mid-move)."""
        try:
            left = await trio.to_thread.run_sync(self.driver.incoming_vms)
        except OSError as e:
            log.warning("listing moved copies: %s", e)
            return
        assert self._nursery is not None
        for copy, pid in left:
            log.info("settling pid %d's copy %s, left by a move cut short", pid, copy)
            self._nursery.start_soon(self._settle, pid, copy)


def _printable(raw: bytes, limit: int = 200) -> str:
    """What the other daemon said, fit for a status line: at most
    ``limit`` bytes of it, decoded as UTF-8 (U+FFFD for what is not), each
    character that is not printable (controls such as terminal escapes and
    NUL, format characters such as U+202E, line separators) shown as "?"."""
    return "".join(c if c.isprintable() else "?" for c in raw[:limit].decode(errors="replace"))


_HANG_UPS = (trio.BrokenResourceError, trio.ClosedResourceError)


def _leaves(e: BaseException):
    """The exceptions in ``e``, groups opened (depth first)."""
    if isinstance(e, BaseExceptionGroup):
        for x in e.exceptions:
            yield from _leaves(x)
    else:
        yield e


def _hung_up(e: BaseException) -> bool:
    """Whether ``e`` (or an exception in the group ``e``) says the other
    daemon closed the connection, and nothing in it must go on up (an
    exception that is not an Exception, bar a Cancelled beside it)."""
    leaves = list(_leaves(e))
    return any(isinstance(x, _HANG_UPS) for x in leaves) \
        and all(isinstance(x, (Exception, trio.Cancelled)) for x in leaves)


def _leaf(e: BaseException) -> BaseException:
    """The first exception in ``e`` that is not a group or a cancellation
    (what went wrong first in a nursery)."""
    while isinstance(e, BaseExceptionGroup):
        inner = [x for x in e.exceptions if not isinstance(x, trio.Cancelled)] or list(e.exceptions)
        e = inner[0]
    return e


async def _exactly(stream: trio.abc.ReceiveStream, buf: bytearray, n: int) -> bytes:
    """The next ``n`` bytes of ``stream`` (``buf`` holds what came early);
    MoveFailed if it ends first."""
    while len(buf) < n:
        more = await stream.receive_some(max(CHUNK, n - len(buf)))
        if not more:
            raise MoveFailed(errno.EPROTO, "move: the other daemon closed the connection")
        buf += more
    with memoryview(buf) as mv, mv[:n] as head:
        out = head.tobytes()
    del buf[:n]
    return out


def _pidfd_of(pid: int | None) -> int | None:
    """A pidfd (pidfd_open(2)) of process ``pid``: readable once it ends;
    -1 when it is gone (or ``pid`` is None), None when it cannot be had
    (then nothing is known)."""
    if pid is None:
        return -1
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return -1
    except (OSError, AttributeError):
        return None


def _ended(pidfd: int | None) -> bool:
    """Whether the process of ``pidfd`` (:func:`_pidfd_of`) has ended; a
    zero-timeout poll(2), some µs."""
    if pidfd is None:
        return False
    if pidfd < 0:
        return True
    p = select.poll()  # (not select(2): the daemon's descriptors may pass FD_SETSIZE)
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Blocking: write all of ``data`` at ``offset`` of ``fd``."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view)
        view = view[n:]


async def _reply(stream: trio.SocketStream, line: bytes) -> None:
    with trio.move_on_after(2):
        try:
            await stream.send_all(line.replace(b"\n", b" ") + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
