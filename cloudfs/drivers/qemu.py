"""The QEMU compute driver: every process is one ``qemu-system-x86_64`` on this host.

State lives in the state directory, so VMs outlive the daemon and a new
daemon (also after ``kill -9``) re-adopts them::

    STATE/images/<name>/        the image store (cloudfs.imagestore)
    STATE/vms/<id>/meta.json    the server: id, name, image, flavor, metadata
                                (deployment/pid/ppid tags), created (0600)
    STATE/vms/<id>/qemu.pid     QEMU's pid (QEMU's -pidfile)
    STATE/vms/<id>/qmp.sock     QMP (docs/interop/qmp-spec) control socket
    STATE/vms/<id>/console.log  the guest's serial console
    STATE/vms/<id>/initramfs.cpio.gz  the image's initramfs + this VM's files
    STATE/vms/<id>/fw-identity, fw-userdata  what fw_cfg hands the guest
    STATE/vms/<id>/scratch.img  its scratch disk (given to QEMU as descriptors)
    STATE/templates/, STATE/snapshots/  boot templates and fork live copies
                                (cloudfs.drivers.qemusnap)
    STATE/logs/<id>.console.log the console of a deleted VM (kept for debugging)
    STATE/kvm-probe.json        the KVM probe's answer (per host boot, QEMU, kernel)

QEMU runs with ``-daemonize`` in its own session: it is not a child of the
daemon and nothing ties its life to the daemon's.  A pid counts as the VM's
only if ``/proc/<pid>/cmdline`` is a qemu-system binary naming this VM's QMP
socket (pids get reused) and it is not a zombie.

Accelerator: TCG unless ``accel="kvm"``, or ``accel="auto"`` (the default)
and :func:`probe_kvm` showed that KVM boots a kernel within a few seconds
(nested KVM on some hosts has /dev/kvm but hangs: the probe times out and
TCG is used).

The kernel is the image's PVH ``vmlinux`` when the store has one (booted
directly by QEMU: about 2 s faster under TCG), else its bzImage; the kernel
command line is ``console=ttyS0 cloudfs.mode=boot quiet panic=-1``.

The guest (image "tiny", cloudfs.guestimage) gets, appended to its
initramfs: ``/etc/cloudfs/identity`` (``CLOUDFS_PID``, server address and
port), ``/etc/cloudfs/userdata``, the scripts of :data:`GUEST_FILES`
(``/sbin/cloudfs-mount``, ``cloudfs-identity``, ``cloudfs-notes``,
``cloudfs-fork``) and ``/etc/cloudfs/boot`` (:data:`BOOT_SCRIPT`); its QEMU
also carries them in fw_cfg (``opt/cloudfs/gen``, ``identity``,
``userdata``), where a VM restored from a boot template or a ``fork live``
copy reads its own.  The boot script mounts the namespace at ``/cloud`` with the kernel's 9P client::

    mount -t 9p -o trans=tcp,port=564,version=9p2000.L,aname=proc/<pid> 10.0.2.2 /cloud

(the command is ``/sbin/cloudfs-mount``, which user-data may run again to
remount after the daemon restarted), runs ``sh /etc/cloudfs/userdata``
(``$CLOUDFS_PID`` set; in a process group of its own) while it takes the
process's notes (``/cloud/proc/self/note``: ``interrupt``/``hangup`` signal
that group, ``kill`` powers off at once with ``cloudfs-exit: 137 note
kill``, others run ``/run/cloudfs/note-handler NOTE`` if the user-data made
it), prints
``cloudfs-exit: <status> <message>`` on the console and powers off, which
ends QEMU (``-no-reboot``): :meth:`QemuDriver.status` then says ``exited``
with that message.  The guest holds no secret: its identity is its channel.

The channel (cloudfs.drivers.netns): QEMU runs in a network namespace of its
own whose only interface is ``lo``, with the ``user`` network (QEMU
user-mode networking, 10.0.2.0/24, guest 10.0.2.15, ``restrict=off`` since
there is nothing to restrict to).  The guest's connections to 10.0.2.2:564
arrive at a TCP listener the driver opens *inside that namespace* and hands,
with the VM's pid, to :attr:`QemuDriver.channel_handler` (the daemon serves
that process's view there, cloudfs.channel).  No host process runs per
guest connection; the guest reaches nothing else (no route leaves the
namespace); the listener a connection arrives on is the VM's identity.  A
restarted daemon opens new listeners in the running VMs' namespaces.

Privileges: as root, QEMU drops to ``qemu_user`` (``-runas``, default
``nobody``) once it has opened its files (kernel, initramfs, disks, console,
QMP socket and pidfile are opened as root before); not as root, QEMU runs
as the daemon's user in a user namespace of its own (``unshare --user
--map-root-user``).  Either way with ``-sandbox`` (seccomp).

Power: ``stop`` pauses the vCPUs (QMP ``stop``; state ``stopped``), ``start``
resumes them (``cont``); ``delete`` sends QMP ``quit`` and SIGKILLs QEMU if it
has not exited after a few seconds.  All blocking work (QMP, subprocesses,
files) runs in worker threads under deadlines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from .. import imagestore
from ..guestimage import append_files
from ..ctl import valid_name
from ..znodes import parse_pid
from . import qemunet, qemusnap
from .extents import data_extents
from .scratchroom import DISK_NAME, ScratchRoom
from .qmp import QmpError, load_state, qmp_command, save_state, start_incoming
from .netns import NetnsError, listen_in, netns_argv
from .base import (
    META_DEPLOYMENT, META_PID, ComputeDriver, server_metadata, DriverError, Image, Network, NotFound, NotOurs, Server, ServerSpec, ServerStats,
)

log = logging.getLogger(__name__)

__all__ = ["QemuDriver", "QmpError", "qmp_command", "probe_kvm", "BOOT_SCRIPT", "MOUNT_SCRIPT", "GUEST_MOUNT",
           "GUEST_ADDRESS", "SERVER_ADDRESS", "GUEST_9P_PORT", "FLAVORS", "ChannelHandler"]

#: Where the guest mounts the namespace.
GUEST_MOUNT = "/cloud"
#: The guest's address on the user network.
GUEST_ADDRESS = "10.0.2.15"
#: The daemon as the guest sees it: user-mode networking's host alias, which
#: QEMU maps to 127.0.0.1 in the VM's network namespace (cloudfs.drivers.netns).
SERVER_ADDRESS = "10.0.2.2"
#: The 9P port the guest dials, and where the channel listens in the VM's namespace.
GUEST_9P_PORT = 564
#: Connections a VM's channel queues before the daemon accepts them (listen(2)).
CHANNEL_BACKLOG = 8
#: Seconds between the channel supervisor's scans of running VMs (a create,
#: rebuild or start wakes it at once).
CHANNEL_CHECK = 1.0
#: Channel listeners being made at once (one nsenter helper each), the
#: seconds one may take, and the seconds before a failed one is tried again.
CHANNEL_OPENS = 4
CHANNEL_TIMEOUT = 5.0
CHANNEL_RETRY = 5.0
#: Flavors: name → (memory MiB, vCPUs); the first is the default.
FLAVORS: dict[str, tuple[int, int]] = {"m1.tiny": (256, 1), "m1.small": (512, 1)}
#: Each flavor's scratch disk (GiB): a sparse raw file per VM, the guest's
#: /dev/vda (vdb when the image has a disk), made anew at create and rebuild.
SCRATCH_GIB: dict[str, int] = {"m1.tiny": 1, "m1.small": 2}
#: Console bytes kept per VM: when STATE/vms/<id>/console.log passes this,
#: its last half moves to console.log.1 (the older half is dropped), checked
#: every CONSOLE_CHECK seconds by :meth:`QemuDriver.run`; so a VM's console
#: takes at most 1.5 × CONSOLE_MAX plus what it writes in CONSOLE_CHECK.
CONSOLE_MAX = 1 << 20
CONSOLE_CHECK = 1.0
#: Seconds before a boot template that failed to be made is tried again.
TEMPLATE_RETRY = 600.0
#: Seconds between sweeps of stale template builds and snapshots (qemusnap).
SWEEP_INTERVAL = 60.0
#: Consoles of deleted VMs kept in STATE/logs (the newest).
LOGS_KEEP = 256
#: Free space (bytes) the state dir's filesystem must keep with every VM's
#: scratch disk full: a VM is made, moved in or forked live only then
#: (cloudfs.drivers.scratchroom).
DISK_RESERVE = 1 << 30
#: Bytes a VM's saved state may take beyond its RAM (device state, pages
#: sent twice): the room a fork live copy claims beyond the RAM, and (half
#: of it) where its save is cancelled; a move's stream may pass the RAM by
#: as much (cloudfs.moves.STREAM_SLACK).
STATE_SLACK = 64 << 20
#: A VM's id: "vm-" and 12 hex digits (new_server_id).
SERVER_ID = re.compile(r"vm-[0-9a-f]{12}")
USER_NET = Network("net-user", "user", "10.0.2.0/24", "active")

#: Serves one VM's channel: ``(pid, listener)``, until cancelled (QemuDriver).
ChannelHandler = Callable[[int, trio.SocketListener], Awaitable[None]]


@dataclass
class _Channel:
    """A VM's channel being served: which QEMU it is in (pid, QEMU's pid,
    network namespace inode) and the scope that ends it."""

    key: tuple[int, int, int]
    scope: trio.CancelScope


#: A VM that should have no channel (QemuDriver._channel_states).
_GONE = (0, 0, 0)


def new_server_id() -> str:
    """A fresh VM id (matches SERVER_ID)."""
    return f"vm-{uuid.uuid4().hex[:12]}"


#: ``/sbin/cloudfs-mount`` in the guest: (re)mount the namespace at /cloud.
#: The boot script uses it; user-data may call it again to remount after the
#: daemon restarted (a 9P connection does not survive its server).
MOUNT_SCRIPT = r"""#!/bin/sh
# cloudfs-mount: mount this VM's view of the cloudfs namespace at /cloud
# with the kernel's 9P client (cloudfs/drivers/qemu.py).  Exit status of mount.
. /etc/cloudfs/identity
mkdir -p /cloud
# under the 9P mount, an empty read-only tmpfs: while /cloud is mounted
# again (after a move, a live copy, a daemon restart) a write fails (EROFS)
# instead of landing in the guest's own root directory
grep -q " /cloud tmpfs " /proc/mounts || mount -t tmpfs -o ro,size=4k,mode=0555 cloudfs-none /cloud
# the last mount on /cloud is the one in use; a 9P one goes (lazily)
[ "$(awk '$2 == "/cloud" { t = $3 } END { print t }' /proc/mounts)" = 9p ] && umount -l /cloud
exec mount -t 9p -o "trans=tcp,port=$CLOUDFS_PORT,version=9p2000.L,msize=65560,aname=proc/$CLOUDFS_PID" \
    "$CLOUDFS_SERVER" /cloud
"""

#: Where the guest finds what QEMU's fw_cfg device holds for it (module
#: qemu_fw_cfg): ``gen`` (GEN_WIDTH bytes: ``<pid> <server id>``, padded;
#: ``template`` in a boot template), ``identity`` and ``userdata``.
FW_CFG_DIR = "/sys/firmware/qemu_fw_cfg/by_name/opt/cloudfs"
GEN_WIDTH = 32

#: ``/sbin/cloudfs-identity``: take this VM's identity and user-data from
#: fw_cfg.  The module is loaded again first: it reads the list of fw_cfg
#: files (and their sizes) once, when it loads, and a restored copy's files
#: are its own QEMU's.  Sets the clock forward to CLOUDFS_EPOCH (a copy
#: keeps the time of the VM it was copied from).  The caller records the
#: new ``gen`` in /run/cloudfs/gen once ``/cloud`` is mounted.
IDENTITY_SCRIPT = r"""#!/bin/sh
# cloudfs-identity: this VM's identity and user-data from QEMU's fw_cfg
# (cloudfs/drivers/qemu.py)
d=/sys/firmware/qemu_fw_cfg/by_name/opt/cloudfs
rmmod qemu_fw_cfg 2>/dev/null
insmod "/lib/modules/$(uname -r)/qemu_fw_cfg.ko" || exit 1
cat $d/identity/raw > /etc/cloudfs/identity.new && mv /etc/cloudfs/identity.new /etc/cloudfs/identity || exit 1
cat $d/userdata/raw > /etc/cloudfs/userdata || exit 1
. /etc/cloudfs/identity
# a copy keeps the clock of what it was copied from: only ever forward
[ -n "$CLOUDFS_EPOCH" ] && [ "$CLOUDFS_EPOCH" -gt "$(date +%s)" ] && date -s "@$CLOUDFS_EPOCH" >/dev/null
exit 0
"""

#: ``/sbin/cloudfs-notes``: take the process's notes one by one (proc(3)):
#: interrupt and hangup signal the user-data's process group, kill powers
#: off at once, any other goes to /run/cloudfs/note-handler (made by the
#: user-data) as its argument.
NOTES_SCRIPT = r"""#!/bin/sh
# cloudfs-notes: the note loop (cloudfs/drivers/qemu.py)
while :; do
  note=$(cat /cloud/proc/self/note 2>/dev/null) || { sleep 1; continue; }
  ud=$(cat /run/cloudfs/userdata.pid 2>/dev/null)
  case "$note" in
    interrupt) [ -n "$ud" ] && kill -INT -"$ud" ;;
    hangup) [ -n "$ud" ] && kill -HUP -"$ud" ;;
    kill) echo "cloudfs-exit: 137 note kill"; sync; poweroff -f ;;
    *) if [ -x /run/cloudfs/note-handler ]; then /run/cloudfs/note-handler "$note" </dev/null &
       else echo "cloudfs-note: $note (no /run/cloudfs/note-handler)"; fi ;;
  esac
done
"""

#: ``/sbin/cloudfs-renew``: if fw_cfg says this is a new VM (a ``fork
#: live`` copy, or moved to another host: its ``gen`` is not the one this
#: guest took), take the new VM's identity and mount ``/cloud`` again.  The
#: old 9P connection belongs to the old VM, and the new one's user-mode
#: network knows nothing of it: a request on it draws a reset, which fails
#: every request still waiting on it (EIO) instead of leaving them blocked.
#: One at a time (a lock directory); exit 0 when there is nothing to do.
RENEW_SCRIPT = r"""#!/bin/sh
# cloudfs-renew: take a new VM's identity and mount /cloud again
# (cloudfs/drivers/qemu.py)
fw=/sys/firmware/qemu_fw_cfg/by_name/opt/cloudfs/gen/raw
until mkdir /run/cloudfs/renew.lock 2>/dev/null; do sleep 0.05; done
trap 'rmdir /run/cloudfs/renew.lock' EXIT
trap 'exit 1' INT TERM HUP
read -r now < $fw
read -r mine < /run/cloudfs/gen
[ "$now" = "$mine" ] && exit 0
timeout 5 cat /cloud/proc/self/status >/dev/null 2>&1
cloudfs-identity || { echo "cloudfs-renew: no identity in fw_cfg"; exit 1; }
. /etc/cloudfs/identity
notes=$(cat /run/cloudfs/notes.pid 2>/dev/null)
[ -n "$notes" ] && kill -9 -"$notes" 2>/dev/null
n=0
until cloudfs-mount 2>/dev/null; do
  n=$((n + 1))
  [ "$n" -ge 200 ] && { echo "cloudfs-renew: cannot mount /cloud (tried again in a second)"; exit 1; }
  sleep 0.05
done
cat $fw > /run/cloudfs/gen
setsid cloudfs-notes </dev/null >/dev/console 2>&1 &
echo $! > /run/cloudfs/notes.pid
echo "cloudfs-renew: /cloud mounted again as process $CLOUDFS_PID"
exit 0
"""

#: ``/sbin/cloudfs-watch``: once a second (a builtin ``read -t`` on a FIFO,
#: no process started), whether this is a new VM: then cloudfs-renew.
WATCH_SCRIPT = r"""#!/bin/sh
# cloudfs-watch: notice a move or a live copy, then cloudfs-renew (cloudfs/drivers/qemu.py)
fw=/sys/firmware/qemu_fw_cfg/by_name/opt/cloudfs/gen/raw
tick=/run/cloudfs/tick
[ -p $tick ] || mkfifo $tick
while :; do
  read -r -t 1 x <> $tick
  read -r now < $fw
  read -r mine < /run/cloudfs/gen
  [ "$now" = "$mine" ] || cloudfs-renew
done
"""

#: ``/sbin/cloudfs-fork [live] [name=N]``: fork(2) for a VM's process.  It
#: writes ``fork …`` to ``/cloud/proc/self/ctl`` and prints the child's pid;
#: after ``fork live`` the child VM resumes inside this same command (a copy
#: of the parent's memory), renews its identity and ``/cloud``
#: (cloudfs-renew) and prints 0.
FORK_SCRIPT = r"""#!/bin/sh
# cloudfs-fork [live] [name=N]: fork this VM's process (docs/namespace.md).
# Prints the child's pid in the parent, 0 in the child of a live fork (whose
# CLOUDFS_PID is then in /etc/cloudfs/identity).  Status 1 if the fork failed.
. /etc/cloudfs/identity
me=$CLOUDFS_PID
fw=/sys/firmware/qemu_fw_cfg/by_name/opt/cloudfs/gen/raw
read -r mine < /run/cloudfs/gen
out=/run/cloudfs/fork.$$
rm -f "$out"
( exec 3<>/cloud/proc/self/ctl && echo "fork $*" >&3 && read -r pid <&3 && echo "$pid" > "$out" ) \
  </dev/null >/dev/null 2>"$out.err" &
w=$!
while :; do
  read -r now < $fw
  if [ "$now" != "$mine" ]; then
    cloudfs-renew >/dev/console 2>&1 || { echo "cloudfs-fork: cannot take the new VM's identity" >&2; exit 1; }
    . /etc/cloudfs/identity
    kill -9 "$w" 2>/dev/null
    rm -f "$out" "$out.err"
    if [ "$CLOUDFS_PID" != "$me" ]; then echo 0; exit 0; fi
    mine=$now  # moved to another host meanwhile: the fork's answer went with the old connection
    echo "cloudfs-fork: the VM moved during the fork; see /cloud/proc/self/children" >&2
    exit 1
  fi
  if ! kill -0 "$w" 2>/dev/null; then
    wait "$w" && [ -s "$out" ] && { cat "$out"; rm -f "$out" "$out.err"; exit 0; }
    cat "$out.err" >&2
    rm -f "$out" "$out.err"
    exit 1
  fi
  sleep 0.02
done
"""

#: The per-VM boot script, run by the tiny image's /init (cloudfs.mode=boot).
BOOT_SCRIPT = r"""#!/bin/sh
# cloudfs per-VM boot script (cloudfs/drivers/qemu.py): take the identity,
# mount the namespace, run the user-data, report its exit status; /init
# powers off afterwards.
export PATH=/sbin:/usr/sbin:/bin:/usr/bin HOME=/root
mkdir -p /run/cloudfs
fw=/sys/firmware/qemu_fw_cfg/by_name/opt/cloudfs/gen/raw
if [ -f /etc/cloudfs/template ]; then
  # a boot template: it is paused and copied while it waits here; a copy
  # goes on as soon as it reads its own identity from fw_cfg
  echo "cloudfs-template: ready"
  # (read's status is 1 here: the blob has no newline; g is set all the same)
  while :; do read -r g < $fw; [ "$g" = template ] || break; sleep 0.01; done
  cloudfs-identity || { echo "cloudfs-exit: 255 no identity in fw_cfg"; exit 255; }
fi
cat $fw > /run/cloudfs/gen 2>/dev/null
. /etc/cloudfs/identity
export CLOUDFS_PID
# the networks besides user, in NIC order: eth1, eth2 … (CLOUDFS_NETS: name=address/prefix …)
i=1
for net in $CLOUDFS_NETS; do
  ip link set "eth$i" up && ip addr add "${net#*=}" dev "eth$i" || echo "cloudfs-boot: cannot set up eth$i ($net)"
  i=$((i + 1))
done
n=0
until cloudfs-mount; do
  n=$((n + 1))
  if [ "$n" -ge 60 ]; then
    echo "cloudfs-exit: 255 cannot mount the namespace from $CLOUDFS_SERVER:$CLOUDFS_PORT"
    exit 255
  fi
  # quickly at first: a restored copy's channel opens a moment after it runs
  if [ "$n" -lt 30 ]; then sleep 0.05; else sleep 1; fi
done
echo "cloudfs-boot: mounted /cloud as process $CLOUDFS_PID"
cd /
setsid cloudfs-notes </dev/null &
echo $! > /run/cloudfs/notes.pid
setsid cloudfs-watch </dev/null >/dev/console 2>&1 &
# the user-data in the foreground (an asynchronous list would ignore SIGINT)
# and in a process group of its own (it leads it: setsid), so a note reaches
# all it started
setsid sh -c 'echo $$ > /run/cloudfs/userdata.pid; exec sh /etc/cloudfs/userdata' </dev/null
st=$?
kill -TERM -"$(cat /run/cloudfs/notes.pid)" 2>/dev/null
echo "cloudfs-exit: $st user-data exited with status $st"
umount /cloud 2>/dev/null
exit 0
"""

#: The files every VM's initramfs gets besides its identity and user-data.
GUEST_FILES: dict[str, str] = {
    "/etc/cloudfs/boot": BOOT_SCRIPT,
    "/sbin/cloudfs-mount": MOUNT_SCRIPT,
    "/sbin/cloudfs-identity": IDENTITY_SCRIPT,
    "/sbin/cloudfs-notes": NOTES_SCRIPT,
    "/sbin/cloudfs-fork": FORK_SCRIPT,
    "/sbin/cloudfs-renew": RENEW_SCRIPT,
    "/sbin/cloudfs-watch": WATCH_SCRIPT,
}


def probe_kvm(qemu: str, kernel: Path, timeout: float = 5.0) -> bool:
    """True when KVM works here: QEMU with ``-accel kvm`` boots ``kernel``
    (without a root filesystem it panics and, with ``panic=-1 -no-reboot``,
    exits) within ``timeout`` seconds.  False when /dev/kvm is not usable,
    QEMU fails, or it hangs (nested KVM): the probe is killed and abandoned
    if even SIGKILL does not end it at once.  Blocks up to ~``timeout`` s."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    argv = [qemu, "-accel", "kvm", "-m", "64", "-nodefaults", "-display", "none", "-no-reboot",
            "-serial", "stdio", "-kernel", str(kernel),
            "-append", "console=ttyS0 panic=-1 rdinit=/cloudfs-kvm-probe root=/dev/cloudfs-none"]
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    except OSError:
        return False
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=1)
        return False
    return p.returncode == 0 and b"Linux version" in out


def _console_tail(vm: "_Vm", limit: int) -> bytes:
    """Blocking: the last ``limit`` bytes of the older and current halves."""
    out = b""
    for p in (vm.console, vm.console_old):  # newest first
        if len(out) >= limit:
            break
        try:
            with open(p, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - (limit - len(out))))
                out = f.read(limit - len(out)) + out
        except OSError:
            continue
    return out[-limit:] if limit else b""


def _rotate(current: Path, old: Path, keep: int) -> None:
    """Blocking: move the last ``keep`` bytes of ``current`` to ``old`` and
    truncate ``current`` (its writer appends: it goes on at offset 0)."""
    with open(current, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - keep))
        tail = f.read(keep)
    fd = os.open(old, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(tail)
    os.truncate(current, 0)


def _task_ticks(pid: int, tid: int) -> int | None:
    """utime + stime (clock ticks) of thread ``tid`` of ``pid`` (proc(5))."""
    try:
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_bytes()
        fields_ = stat[stat.rindex(b")") + 2:].split()
        return int(fields_[11]) + int(fields_[12])
    except (OSError, ValueError, IndexError):
        return None


def _uptime(pid: int) -> int | None:
    """Seconds since process ``pid`` started (its starttime, proc(5))."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        start = int(stat[stat.rindex(b")") + 2:].split()[19]) / os.sysconf("SC_CLK_TCK")
        return max(0, int(float(Path("/proc/uptime").read_text().split()[0]) - start))
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str:
    """This host boot's id (changes at every reboot)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _opt(path: Path) -> str:
    """``path`` as a value in a QEMU option list (a comma doubled)."""
    return str(path).replace(",", ",,")


def _gen(vm: "_Vm") -> str:
    """The VM's fw_cfg ``gen``: ``<pid> <id>`` (``template`` for a boot
    template) padded to GEN_WIDTH: every VM's has that size, since the
    guest's fw_cfg module keeps the sizes it read at boot."""
    text = "template" if vm.metadata.get(META_PID) is None else f"{vm.metadata[META_PID]} {vm.id}"
    return text[:GEN_WIDTH].ljust(GEN_WIDTH)


#: Whether a pid runs the QEMU whose command line names a marker (its QMP socket).
_pid_alive = qemunet.qemu_running


@dataclass
class _Vm:
    """One VM directory's meta.json, plus its paths."""

    id: str
    dir: Path
    name: str
    image: str
    flavor: str
    networks: list[str]
    metadata: dict[str, str]
    created: str
    accel: str = "tcg"
    #: network name → this VM's address on it (the networks besides ``user``)
    nets: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"

    @property
    def console_old(self) -> Path:
        return self.dir / "console.log.1"

    @property
    def scratch(self) -> Path:
        return self.dir / DISK_NAME

    @property
    def initramfs(self) -> Path:
        return self.dir / "initramfs.cpio.gz"

    @property
    def fw_identity(self) -> Path:
        return self.dir / "fw-identity"

    @property
    def fw_userdata(self) -> Path:
        return self.dir / "fw-userdata"

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "name": self.name, "image": self.image, "flavor": self.flavor,
                           "networks": self.networks, "metadata": self.metadata,
                           "created": self.created, "accel": self.accel, "nets": self.nets}, indent=2) + "\n"

    @classmethod
    def load(cls, d: Path) -> "_Vm | None":
        try:
            return cls.parse(d, (d / "meta.json").read_bytes())
        except OSError:
            return None

    @classmethod
    def parse(cls, d: Path, raw: bytes) -> "_Vm | None":
        """The VM of directory ``d`` from its meta.json bytes; None if malformed."""
        try:
            m = json.loads(raw)
            return cls(id=m["id"], dir=d, name=m["name"], image=m["image"], flavor=m["flavor"],
                       networks=list(m["networks"]), metadata=dict(m["metadata"]),
                       created=m["created"], accel=m.get("accel", "tcg"),
                       nets={str(k): str(v) for k, v in dict(m.get("nets", {})).items()})
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def pid(self) -> int | None:
        """QEMU's pid if it is running this VM now."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid, str(self.qmp)) else None

    def exit_message(self) -> str:
        """The last ``cloudfs-exit:`` line of the console, as ``exit <st>: <msg>``."""
        tail = _console_tail(self, 65536).decode(errors="replace")  # also across a cut
        if not tail:
            return "QEMU exited"
        for line in reversed(tail.splitlines()):
            line = line.strip()
            if line.startswith("cloudfs-exit:"):
                parts = line[len("cloudfs-exit:"):].split(None, 1)
                if parts:
                    return f"exit {parts[0]}" + (f": {parts[1]}" if len(parts) > 1 else "")
        if "Kernel panic" in tail:
            return "guest kernel panic"
        return "guest powered off" if "cloudfs-guest: powering off" in tail else "QEMU exited"


class QemuDriver(ComputeDriver):
    """VMs as local QEMU processes (module docstring for layout and guest).

    ``state_dir``: the daemon's state directory (``STATE``; created if
    missing).  ``accel``: ``"auto"`` (probe KVM once, else TCG), ``"tcg"`` or
    ``"kvm"``.  ``kvm_probe_timeout`` seconds.  ``qemu`` the binary.  ``host``
    the name reported as each server's host (default: this machine's
    hostname; ``cloudfs up`` gives its ``/hosts`` name).  ``kernel_args`` extra guest kernel arguments; ``bios`` a
    firmware file for ``-bios`` (e.g. /usr/share/qemu/qboot.rom; None:
    QEMU's default).  ``qemu_user``: the user QEMU runs as (``-runas``) when
    the daemon is root (None: stays root; ValueError if there is no such
    user); ignored otherwise.

    :attr:`channel_handler` (settable at any time, e.g. once the namespace
    exists): an async function ``(pid, listener)`` that serves the VM of
    process ``pid`` on ``listener`` (a trio SocketListener in the VM's
    network namespace, see cloudfs.drivers.netns) until cancelled;
    :meth:`run` opens a listener per running VM of the bound deployment and
    runs the handler for it, cancelling it when that QEMU ends.  None: guests
    find nobody to mount from.

    Errors: NotFound (unknown image, flavor, network, server), DriverError
    (QEMU failed to start; its stderr is in the message), QmpError (QMP).
    """

    kind = "qemu"

    def __init__(self, state_dir: Path, *, accel: str = "auto", kvm_probe_timeout: float = 5.0,
                 qemu: str = "qemu-system-x86_64", host: str | None = None, kernel_args: str = "",
                 bios: str | None = None, qemu_user: str | None = "nobody",
                 channel_handler: ChannelHandler | None = None, snapshot_boot: bool = True,
                 shm: Path | None = None):
        if accel not in ("auto", "tcg", "kvm"):
            raise ValueError(f"accel must be auto, tcg or kvm, not {accel!r}")
        self.state_dir = Path(state_dir).resolve()
        self.vms_dir = self.state_dir / "vms"
        self.logs_dir = self.state_dir / "logs"
        self.accel = accel
        self.kvm_probe_timeout = kvm_probe_timeout
        self.qemu = qemu
        self.host = host or socket.gethostname()
        # only this daemon reaches its VMs: this machine and state dir
        self.scope = f"qemu!{socket.gethostname()}!{self.state_dir}"
        self.kernel_args = kernel_args
        self.bios = bios
        self.rootless = os.geteuid() != 0
        self.qemu_user = None if self.rootless else qemu_user
        if self.qemu_user is not None:
            try:
                pwd.getpwnam(self.qemu_user)
            except KeyError:
                raise ValueError(f"no user {self.qemu_user!r} for QEMU to run as") from None
        self.channel_handler = channel_handler
        self._accel_chosen: str | None = None if accel == "auto" else accel
        self._lock = trio.Lock()
        self._running = False
        self._channels: dict[str, _Channel] = {}
        self._poke = trio.Event()
        self.nets_dir = self.state_dir / "nets"
        self._nets_lock = threading.Lock()  # making networks; the table of per-network locks
        self._net_locks: dict[str, threading.Lock] = {}
        self.snapshot_boot = snapshot_boot
        self.templates_dir = self.state_dir / "templates"
        self.snapshots_dir = self.state_dir / "snapshots"
        # what guests may still write on the scratch disks here: fork live copies' and VMs'
        self._room = ScratchRoom(self.state_dir, (self.snapshots_dir, self.vms_dir), DISK_RESERVE)
        shm = Path(shm) if shm is not None else Path("/dev/shm")
        self.shm_dir = qemusnap.shm_dir_for(shm if shm.is_dir() else self.templates_dir, self.state_dir)
        self._moving: set[str] = set()  # VMs being copied (fork live)
        self._moving_lock = threading.Lock()
        #: held while a QEMU restoring a template starts and while a template is
        #: removed: the RAM file must not go between finding it and QEMU opening it
        self._templates_lock = threading.Lock()
        self._building: set[str] = set()  # template build directories in use
        self._template_wanted: dict[tuple[str, str, str], None] = {}
        self._template_failed: dict[tuple[str, str, str], float] = {}
        self._template_poke = trio.Event()
        self._stop_building = threading.Event()
        self.vms_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.vms_dir, 0o700)

    # -- helpers ----------------------------------------------------------

    async def _choose_accel(self, kernel: Path) -> str:
        """The accelerator for new VMs; with ``auto`` the KVM probe runs once
        per host boot, QEMU binary and guest kernel (its answer is kept in
        ``STATE/kvm-probe.json``, so a restarted daemon does not probe again)."""
        async with self._lock:
            if self._accel_chosen is None:
                key = {"boot_id": _boot_id(), "qemu": shutil.which(self.qemu) or self.qemu, "kernel": str(kernel)}
                cache = self.state_dir / "kvm-probe.json"
                try:
                    got = json.loads(cache.read_text())
                    if got.get("key") == key and got.get("accel") in ("kvm", "tcg"):
                        self._accel_chosen = got["accel"]
                        return got["accel"]
                except (OSError, ValueError, AttributeError):
                    pass
                ok = await trio.to_thread.run_sync(probe_kvm, self.qemu, kernel, self.kvm_probe_timeout,
                                                   abandon_on_cancel=True)
                self._accel_chosen = "kvm" if ok else "tcg"
                log.info("KVM probe: %s; using %s", "works" if ok else "failed or hung", self._accel_chosen)
                with contextlib.suppress(OSError):
                    cache.write_text(json.dumps({"key": key, "accel": self._accel_chosen}) + "\n")
            return self._accel_chosen

    def _load(self, server_id: str) -> _Vm | None:
        """Blocking: VM ``server_id`` of any deployment, or None (also for an
        id that is not a plain directory name)."""
        if not server_id or "/" in server_id or server_id.startswith(".") or "\0" in server_id:
            return None
        return _Vm.load(self.vms_dir / server_id)

    def _vm(self, server_id: str) -> _Vm:
        """Blocking: the VM ``server_id`` of the bound deployment; NotFound
        for a bad id, a missing VM or another deployment's."""
        vm = self._load(server_id)
        if vm is None:
            raise NotFound(f"no server {server_id!r}")
        if not self.ours(vm.metadata):
            raise NotOurs(f"server {server_id} is not deployment {self.deployment}'s")
        return vm

    def _adopt(self, pid: int) -> Server | None:
        """Blocking: the oldest running VM of this deployment tagged with
        ``pid`` (a create whose reply was lost), deleting any other VM of
        that pid; None (and nothing deleted) if none runs."""
        found = self._ours(pid)
        live = [vm for vm in found if vm.pid() is not None]
        if not live:
            return None
        keep = live[0]
        for vm in found:
            if vm is not keep:
                log.warning("deleting duplicate %s of pid %d (keeping %s)", vm.id, pid, keep.id)
                self._remove(vm)
        log.info("adopting %s for pid %d", keep.id, pid)
        return self._server(keep)

    def _remove(self, vm: _Vm) -> None:
        """Blocking: end QEMU, take it off its networks and remove the VM
        directory, keeping its console (both halves, at most CONSOLE_MAX
        bytes) as STATE/logs/<id>.console.log."""
        self._kill(vm)
        self._unplug(vm)
        self.logs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            kept = _console_tail(vm, CONSOLE_MAX)
            fd = os.open(self.logs_dir / f"{vm.id}.console.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(kept)
        with contextlib.suppress(OSError):  # the newest LOGS_KEEP consoles stay
            logs = sorted(self.logs_dir.glob("*.console.log"), key=lambda p: p.stat().st_mtime, reverse=True)
            for old in logs[LOGS_KEEP:]:
                old.unlink(missing_ok=True)
        (vm.dir / "meta.json").unlink(missing_ok=True)
        shutil.rmtree(vm.dir, ignore_errors=True)

    def console_path(self, server_id: str) -> Path:
        """Where the console of ``server_id`` is kept once it is deleted."""
        return self.logs_dir / f"{server_id}.console.log"

    def _ours(self, pid: int) -> list[_Vm]:
        """Blocking: the VMs of the bound deployment tagged with ``pid``, oldest first."""
        found = []
        for d in self.vms_dir.iterdir():
            vm = _Vm.load(d)
            if vm is not None and self.ours(vm.metadata) and vm.metadata.get(META_PID) == str(pid) \
                    and not vm.metadata.get("incoming"):  # a move here not recorded yet is not the pid's VM
                found.append(vm)
        return sorted(found, key=lambda v: (v.created, v.id))

    def _server(self, vm: _Vm) -> Server:
        """Blocking: the Server for ``vm`` now (QMP query-status if running)."""
        pid = vm.pid()
        addrs = ((GUEST_ADDRESS,) if "user" in vm.networks else ()) + tuple(vm.nets.values())
        if vm.metadata.get("incoming"):  # a move here not settled yet (cloudfs.moves): nobody acts on it
            return Server(vm.id, vm.name, "unknown", self.host, addrs, "being moved here")
        if pid is None:
            return Server(vm.id, vm.name, "exited", self.host, addrs, vm.exit_message())
        try:
            st = qmp_command(vm.qmp, "query-status", timeout=3.0)
            status = st.get("status", "") if isinstance(st, dict) else ""
        except QmpError as e:
            if vm.pid() is None:
                return Server(vm.id, vm.name, "exited", self.host, addrs, vm.exit_message())
            log.info("status of %s: %s", vm.id, e)
            return Server(vm.id, vm.name, "unknown", self.host, addrs, str(e))  # QEMU runs; we cannot tell more
        if status == "running":
            return Server(vm.id, vm.name, "running", self.host, addrs)
        if status in ("paused", "suspended", "prelaunch"):
            return Server(vm.id, vm.name, "stopped", self.host, addrs)
        if status in ("internal-error", "guest-panicked", "io-error"):
            return Server(vm.id, vm.name, "error", self.host, addrs, f"QEMU reports {status}")
        if status == "postmigrate":  # paused by a copy or a move: it runs on, or is resumed or ended
            with self._moving_lock:
                moving = vm.id in self._moving
            if moving:
                return Server(vm.id, vm.name, "running", self.host, addrs)
            return Server(vm.id, vm.name, "unknown", self.host, addrs, "paused by a copy or move cut short")
        if status == "shutdown":
            return Server(vm.id, vm.name, "exited", self.host, addrs, vm.exit_message())
        return Server(vm.id, vm.name, "unknown", self.host, addrs, f"QEMU reports {status or 'no status'}")

    def _argv(self, vm: _Vm, image: imagestore.StoredImage, *, initrd: Path | None = None,
              memory: str | None = None, scratch_fds: tuple[int, int] = (-1, -1)) -> list[str]:
        """QEMU's command line for ``vm``: ``initrd`` (default the VM's own
        initramfs) and ``memory``, the ``-object`` of its RAM (id ``mem``;
        default anonymous memory).  Every VM has the same devices for its
        flavor and networks, so a state saved from one loads into another
        (boot templates, ``fork live``).

        The scratch disk is given as two descriptors (``scratch_fds``:
        read-write and read-only, inherited by QEMU) in fd set 1, not as a
        path: when a migration ends QEMU re-opens its disks read-only, by
        then as ``qemu_user``, who may not reach the state dir.  Without
        image locking: the file is this VM's alone, and OFD locks taken
        through the set's descriptors outlive the re-opening (``cont``
        after a copy would fail to get its "write" lock back)."""
        mib, cpus = FLAVORS.get(vm.flavor, next(iter(FLAVORS.values())))
        memory = memory or f"memory-backend-ram,id=mem,size={mib}M"
        # the VM's own network namespace: the guest reaches only its channel
        netdev = "user,id=n0,restrict=off,net=10.0.2.0/24"
        argv = netns_argv(self.rootless) + [
            self.qemu, "-name", f"cloudfs-{vm.id}", "-accel", vm.accel, "-m", str(mib), "-smp", str(cpus),
            "-object", memory, "-machine", "memory-backend=mem",
            "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", str(image.kernel_pvh or image.kernel), "-initrd", str(initrd or vm.initramfs),
            "-append", f"console=ttyS0 cloudfs.mode=boot quiet panic=-1 {self.kernel_args}".strip(),
            "-chardev", f"file,id=con,path={vm.console},append=on", "-serial", "chardev:con",
            "-qmp", f"unix:{vm.qmp},server=on,wait=off",
            "-pidfile", str(vm.pidfile), "-daemonize",
            # seccomp: no obsolete system calls, no scheduler/affinity changes
            # (spawn stays allowed: -daemonize forks; elevateprivileges=deny
            # stops QEMU 7.2 from starting, and -runas needs setuid)
            "-sandbox", "on,obsolete=deny,resourcecontrol=deny",
            # what the guest reads from fw_cfg (FW_CFG_DIR): a copy of a VM
            # finds its own identity there; vmgenid tells its kernel to reseed
            "-fw_cfg", f"name=opt/cloudfs/gen,string={_gen(vm)}",
            "-fw_cfg", f"name=opt/cloudfs/identity,file={_opt(vm.fw_identity)}",
            "-fw_cfg", f"name=opt/cloudfs/userdata,file={_opt(vm.fw_userdata)}",
            "-device", "vmgenid",
        ]
        if self.qemu_user:
            argv += ["-runas", self.qemu_user]
        if self.bios:
            argv += ["-bios", self.bios]
        if vm.networks:
            argv += ["-netdev", netdev, "-device", "virtio-net-pci,netdev=n0"]
        for i, (name, addr) in enumerate(vm.nets.items(), 1):  # eth1, eth2 …: a port of each network's hub
            sock = self._net(name).port(vm.id)
            argv += ["-netdev", f"stream,id=n{i},server=on,addr.type=unix,addr.path={sock}",
                     "-device", f"virtio-net-pci,netdev=n{i},mac={qemunet.mac_of(addr)}"]
        if image.disk is not None:
            argv += ["-drive", f"file={image.disk},if=virtio,snapshot=on"]
        rw, ro = scratch_fds
        argv += ["-add-fd", f"fd={rw},set=1,opaque=scratch-rw", "-add-fd", f"fd={ro},set=1,opaque=scratch-ro",
                 "-drive", "file=/dev/fdset/1,file.locking=off,if=virtio,format=raw,id=scratch",
                 "-device", "virtio-balloon-pci,id=balloon0"]
        return argv

    def _identity(self, vm: _Vm) -> str:
        """The guest's /etc/cloudfs/identity (sh assignments)."""
        pid = vm.metadata.get(META_PID, "0")
        nets = " ".join(f"{n}={a}/{self._net_prefix(n)}" for n, a in vm.nets.items())
        return (f"CLOUDFS_PID={int(pid)}\nCLOUDFS_SERVER={SERVER_ADDRESS}\nCLOUDFS_PORT={GUEST_9P_PORT}\n"
                f"CLOUDFS_NETS='{nets}'\nCLOUDFS_EPOCH={int(time.time())}\n")

    def _write_fw(self, vm: _Vm, userdata: bytes, identity: str | None = None) -> None:
        """Blocking: the files QEMU hands the guest through fw_cfg."""
        for path, data in ((vm.fw_identity, (self._identity(vm) if identity is None else identity).encode()),
                           (vm.fw_userdata, bytes(userdata))):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)

    def _prepare(self, vm: _Vm, image: imagestore.StoredImage, userdata: bytes) -> None:
        """Blocking: write the VM's initramfs (identity, user-data, the guest
        scripts) and its fw_cfg files."""
        identity = self._identity(vm)
        # Both are created mode 0600 (never through the umask: it is the
        # whole process's, and this runs in a worker thread).
        self._write_fw(vm, userdata, identity)
        append_files(image.initramfs, {**GUEST_FILES, "/etc/cloudfs/identity": identity,
                                       "/etc/cloudfs/userdata": bytes(userdata)}, vm.initramfs)

    def _launch(self, vm: _Vm, image: imagestore.StoredImage, *, initrd: Path | None = None,
                memory: str | None = None, state: Path | None = None, scratch: Path | None = None,
                incoming_fd: int | None = None, needs: tuple[threading.Lock, Path] | None = None) -> None:
        """Blocking: start QEMU (daemonized, own session) with a fresh
        scratch disk, or, given ``state``, restore that saved state into it
        (``-incoming``; ``scratch`` then the disk saved with it, moved into
        the VM) and let it run; DriverError on failure (QmpError if the
        state does not load)."""
        for p in (vm.qmp, vm.pidfile):
            p.unlink(missing_ok=True)
        try:
            if scratch is not None:
                self._room.rename(scratch, vm.scratch)
            else:
                # made aside, then renamed over the old one (a rebuild's): there
                # is always a disk to count (cloudfs.drivers.scratchroom)
                new = vm.scratch.with_name(vm.scratch.name + ".new")
                new.unlink(missing_ok=True)
                fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.ftruncate(fd, SCRATCH_GIB.get(vm.flavor, 1) << 30)  # sparse: no space until written
                finally:
                    os.close(fd)
                os.replace(new, vm.scratch)
            fd = os.open(vm.console, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # the user-data's output
            how = "restoring" if state is not None else "starting"
            with os.fdopen(fd, "ab") as f:
                f.write(f"--- cloudfs: {how} {vm.id} ({vm.accel}) at {time.strftime('%H:%M:%S')} ---\n".encode())
            rw = os.open(vm.scratch, os.O_RDWR | os.O_CLOEXEC)
            try:
                ro = os.open(vm.scratch, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                os.close(rw)
                raise
        except OSError as e:
            raise DriverError(f"preparing the scratch disk and console of {vm.id}: {e.strerror or e}") from e
        fds = (rw, ro)
        try:
            argv = self._argv(vm, image, initrd=initrd, memory=memory, scratch_fds=fds)
            if state is not None or incoming_fd is not None:
                argv += ["-incoming", "defer"]
            if incoming_fd is not None:
                argv += ["-S"]  # a moved VM runs once its move is recorded (incoming_commit)
            # ``needs``: a file QEMU opens as it starts, kept (under the lock) until it has
            with needs[0] if needs is not None else contextlib.nullcontext():
                if needs is not None and not needs[1].exists():
                    raise DriverError(f"{needs[1]} is gone")
                p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True, timeout=60, pass_fds=fds)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DriverError(f"cannot start QEMU: {e}") from e
        finally:
            for fd in fds:
                os.close(fd)
        if p.returncode != 0 or vm.pid() is None:
            err = (p.stderr or b"").decode(errors="replace").strip()[-1500:]
            raise DriverError(f"QEMU failed to start (status {p.returncode}): {err or 'no message'}")
        if state is not None:
            load_state(vm.qmp, state)
            qmp_command(vm.qmp, "cont")
        if incoming_fd is not None:
            start_incoming(vm.qmp, incoming_fd)
        # the guest's balloon driver reports its memory use every few seconds
        with contextlib.suppress(QmpError):
            qmp_command(vm.qmp, "qom-set", {"path": "/machine/peripheral/balloon0",
                                            "property": "guest-stats-polling-interval", "value": 2})

    def _kill(self, vm: _Vm, grace: float = 5.0) -> None:
        """Blocking: end QEMU (QMP quit, then SIGKILL after ``grace`` s)."""
        pid = vm.pid()
        if pid is None:
            return
        with contextlib.suppress(QmpError):
            qmp_command(vm.qmp, "quit", timeout=2.0)
        deadline = time.monotonic() + grace
        while vm.pid() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        if vm.pid() is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while vm.pid() is not None and time.monotonic() < deadline:
                time.sleep(0.05)
        if vm.pid() is not None:
            raise DriverError(f"QEMU {pid} of {vm.id} does not die")

    # -- ComputeDriver ------------------------------------------------------

    async def create(self, spec: ServerSpec) -> Server:
        """Find or boot the VM of ``spec.pid``: the oldest running VM of this
        deployment tagged with that pid is adopted (any other of that pid is
        deleted); otherwise write its directory and initramfs and start QEMU; returns
        it ``running`` (the guest is booting).  The tags go to meta.json;
        ``spec.secret`` is not used (the guest's channel is its identity).  NotFound
        for an unknown image/flavor/network; DriverError ENOSPC without room
        for its scratch disk (cloudfs.drivers.scratchroom).

        Snapshot boot: a VM on the user network alone is restored from its
        image and flavor's boot template when there is one (qemusnap),
        else it boots cold and the template is made in the background
        (while :meth:`run` runs; ``snapshot_boot=False``: never).  A
        template that fails to restore is dropped and the VM boots cold.
        ``spec.snapshot``: restore that ``fork live`` snapshot instead
        (DriverError if it is gone; it is consumed)."""
        adopted = await trio.to_thread.run_sync(self._adopt, spec.pid)
        if adopted is not None:
            return adopted
        if spec.snapshot:
            return await self._create_from_snapshot(spec)
        meta = self.metadata_for(spec)
        img = await trio.to_thread.run_sync(imagestore.get_image, self.state_dir, spec.image)
        if img is None:
            raise NotFound(f"no image {spec.image!r} in {imagestore.images_dir(self.state_dir)}")
        flavor = spec.flavor or next(iter(FLAVORS))
        if flavor not in FLAVORS:
            raise NotFound(f"no flavor {flavor!r}")
        # the user network always (it is the channel), then the others named
        networks = [USER_NET.name] + list(dict.fromkeys(n for n in spec.networks if n != USER_NET.name))
        known = {n.name for n in await trio.to_thread.run_sync(self._nets)}
        for n in networks[1:]:
            if n not in known:
                raise NotFound(f"no network {n!r}")
        accel = await self._choose_accel(img.kernel)
        vid = new_server_id()
        vm = _Vm(id=vid, dir=self.vms_dir / vid, name=spec.name, image=spec.image, flavor=flavor,
                 networks=networks, metadata=meta,
                 created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), accel=accel)

        eligible = self.snapshot_boot and networks == [USER_NET.name]

        def boot() -> tuple[Server, bool]:
            with self._room.claim(SCRATCH_GIB.get(flavor, 1) << 30, f"a {flavor} VM's scratch disk", vm.scratch):
                vm.dir.mkdir(mode=0o700)
                restored = False
                try:
                    self._plug(vm, networks[1:])
                    tpl = self._ready_template(img, flavor, accel) if eligible else None
                    if tpl is not None:
                        restored = self._restore_template(vm, img, tpl, spec.userdata)
                    if not restored:
                        self._prepare(vm, img, spec.userdata)
                        self._launch(vm, img)
                    self._connect(vm)
                except BaseException:
                    with contextlib.suppress(DriverError):
                        self._kill(vm)
                    self._unplug(vm)
                    shutil.rmtree(vm.dir, ignore_errors=True)
                    raise
            # meta.json last: find() sees only VMs whose QEMU was started
            self._write_meta(vm)
            return Server(vm.id, vm.name, "running", self.host, (GUEST_ADDRESS, *vm.nets.values())), restored

        server, restored = await trio.to_thread.run_sync(boot)
        self._poke_channels()
        if eligible and not restored:
            self._want_template(spec.image, flavor, accel)
        log.info("created %s (%s, %s) for pid %d of deployment %s", vm.id, accel,
                 "from its boot template" if restored else "cold boot", spec.pid, self.deployment)
        return server

    # -- boot templates and fork live (cloudfs.drivers.qemusnap) -------------------------

    def _template_key(self, img: imagestore.StoredImage, flavor: str, accel: str) -> str | None:
        """Blocking: the key of ``img``'s template for ``flavor`` and
        ``accel`` (what its saved state depends on); None if a file of it
        cannot be read."""
        mib, cpus = FLAVORS[flavor]
        try:
            q = shutil.which(self.qemu) or self.qemu
            st = os.stat(q)
            files = [(str(p), os.stat(p).st_size, os.stat(p).st_mtime_ns)
                     for p in (img.kernel_pvh or img.kernel, img.initramfs, img.disk) if p is not None]
        except OSError:
            return None
        guest = hashlib.sha256(json.dumps(GUEST_FILES, sort_keys=True).encode()).hexdigest()
        return qemusnap.template_key({
            "image": [img.name, img.id, img.checksum], "files": files,
            "qemu": [os.path.realpath(q), st.st_size, st.st_mtime_ns], "mib": mib, "cpus": cpus, "accel": accel,
            "kernel_args": self.kernel_args, "bios": self.bios, "qemu_user": self.qemu_user,
            "rootless": self.rootless, "guest": guest})

    def _ready_template(self, img: imagestore.StoredImage, flavor: str, accel: str) -> qemusnap.Template | None:
        """Blocking: ``img``'s ready boot template for ``flavor`` and ``accel``, or None."""
        key = self._template_key(img, flavor, accel)
        if key is None:
            return None
        return qemusnap.load_template(self.templates_dir / qemusnap.template_name(img.name, flavor, key), key)

    def _restore_template(self, vm: _Vm, img: imagestore.StoredImage, tpl: qemusnap.Template,
                          userdata: bytes) -> bool:
        """Blocking: start ``vm`` as a copy of boot template ``tpl``; False
        (and the template removed, nothing left running) if that fails."""
        try:
            self._write_fw(vm, userdata)
            self._launch(vm, img, initrd=tpl.initramfs, state=tpl.state, needs=(self._templates_lock, tpl.memory),
                         memory=f"memory-backend-file,id=mem,size={tpl.mib}M,mem-path={_opt(tpl.memory)},share=off")
            return True
        except DriverError as e:
            log.warning("%s: restoring boot template %s failed (%s); dropping it, booting cold",
                        vm.id, tpl.dir.name, e)
            with contextlib.suppress(DriverError):
                self._kill(vm)
            self._remove_template(tpl.dir)
            return False

    def _remove_template(self, d: Path) -> None:
        """Blocking: remove template directory ``d`` and its RAM file (VMs
        restored from it keep their mapping of the file)."""
        with self._templates_lock:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                mem = Path(json.loads((d / "template.json").read_text())["memory"])
                if mem.parent == self.shm_dir:
                    mem.unlink(missing_ok=True)
            shutil.rmtree(d, ignore_errors=True)

    def _want_template(self, image: str, flavor: str, accel: str) -> None:
        """Ask :meth:`run`'s template builder for this template (no-op when
        it does not run, or the last try failed less than TEMPLATE_RETRY s ago)."""
        want = (image, flavor, accel)
        failed = self._template_failed.get(want)
        if not self._running or (failed is not None and time.monotonic() - failed < TEMPLATE_RETRY):
            return
        self._template_wanted[want] = None
        self._template_poke.set()

    async def prepare_template(self, image: str, flavor: str = "") -> Path:
        """Make (or find) the boot template of ``image`` and ``flavor``
        (default the first) now; returns its directory.  NotFound for an
        unknown image or flavor; DriverError if the template guest does not
        boot to its wait within TEMPLATE_BOOT_TIMEOUT s or its state
        cannot be saved."""
        flavor = flavor or next(iter(FLAVORS))
        if flavor not in FLAVORS:
            raise NotFound(f"no flavor {flavor!r}")
        img = await trio.to_thread.run_sync(imagestore.get_image, self.state_dir, image)
        if img is None:
            raise NotFound(f"no image {image!r}")
        accel = await self._choose_accel(img.kernel)
        tpl = await trio.to_thread.run_sync(self._build_template, img, flavor, accel, abandon_on_cancel=True)
        return tpl.dir

    async def _template_builder(self) -> None:
        """Make the templates creates asked for, one at a time."""
        while True:
            await self._template_poke.wait()
            self._template_poke = trio.Event()
            while self._template_wanted:
                want = next(iter(self._template_wanted))
                image, flavor, accel = want
                try:
                    img = await trio.to_thread.run_sync(imagestore.get_image, self.state_dir, image)
                    if img is None:
                        raise NotFound(f"no image {image!r}")
                    tpl = await trio.to_thread.run_sync(self._build_template, img, flavor, accel,
                                                        abandon_on_cancel=True)
                    log.info("boot template %s ready", tpl.dir.name)
                except (DriverError, OSError) as e:
                    log.warning("no boot template of %s (%s, %s): %s; its VMs boot cold", image, flavor, accel, e)
                    self._template_failed[want] = time.monotonic()
                except Exception:  # never take the daemon down for this
                    log.exception("making the boot template of %s", image)
                    self._template_failed[want] = time.monotonic()
                finally:
                    self._template_wanted.pop(want, None)

    def _build_template(self, img: imagestore.StoredImage, flavor: str, accel: str) -> qemusnap.Template:
        """Blocking: boot ``img`` as a template guest with its RAM in a
        shared file under :attr:`shm_dir`, wait for its boot script to say
        ``cloudfs-template: ready``, pause it, save its state without that
        RAM and end it; older templates of the image and flavor go."""
        key = self._template_key(img, flavor, accel)
        if key is None:
            raise DriverError(f"cannot read the files of image {img.name!r}")
        final = self.templates_dir / qemusnap.template_name(img.name, flavor, key)
        tpl = qemusnap.load_template(final, key)
        if tpl is not None:
            return tpl
        mib = FLAVORS[flavor][0]
        tid = uuid.uuid4().hex[:8]
        build = self.templates_dir / f".b-{tid}"  # short: QEMU's QMP socket path must fit sun_path
        mem = self.shm_dir / f"{final.name}-{tid}.mem"
        vm = _Vm(id=f"tpl-{tid}", dir=build, name=f"template-{img.name}", image=img.name, flavor=flavor,
                 networks=[USER_NET.name], metadata={}, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 accel=accel)
        self.templates_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.shm_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._building.add(build.name)
        try:
            build.mkdir(mode=0o700)
            self._write_fw(vm, b"", identity="")  # mode 0600, as append_files makes its output
            append_files(img.initramfs, {**GUEST_FILES, "/etc/cloudfs/template": ""}, vm.initramfs)
            self._launch(vm, img, memory=f"memory-backend-file,id=mem,size={mib}M,mem-path={_opt(mem)},share=on")
            deadline = time.monotonic() + qemusnap.TEMPLATE_BOOT_TIMEOUT
            while b"cloudfs-template: ready" not in _console_tail(vm, 65536):
                if vm.pid() is None:
                    raise DriverError(f"the template guest of {img.name} ended: {vm.exit_message()}")
                if time.monotonic() > deadline or self._stop_building.is_set():
                    raise DriverError(f"the template guest of {img.name} did not boot within "
                                      f"{qemusnap.TEMPLATE_BOOT_TIMEOUT:g} s")
                time.sleep(0.05)
            qmp_command(vm.qmp, "stop")
            save_state(vm.qmp, build / "state")
            self._kill(vm)
            qemusnap.write_json(build / "template.json", {
                "key": key, "memory": str(mem), "mib": mib, "image": img.name, "flavor": flavor,
                "made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            for d in self.templates_dir.glob(f"{img.name}-{flavor}-*"):
                self._remove_template(d)
            os.rename(build, final)
        except BaseException:
            with contextlib.suppress(DriverError):
                self._kill(vm)
            shutil.rmtree(build, ignore_errors=True)
            mem.unlink(missing_ok=True)
            raise
        finally:
            self._building.discard(build.name)
        tpl = qemusnap.load_template(final, key)
        if tpl is None:
            raise DriverError(f"boot template {final.name} is incomplete")
        log.info("made boot template %s (state %d bytes)", final.name, tpl.state.stat().st_size)
        return tpl

    def _sweep_templates(self) -> None:
        """Blocking: end and remove template builds no one is making (a
        daemon killed mid-build), and RAM files no template names."""
        used: set[Path] = set()
        for d in self.templates_dir.iterdir() if self.templates_dir.is_dir() else ():
            if d.name.startswith(".b-"):
                if d.name not in self._building:
                    stale = _Vm(d.name, d, "", "", "m1.tiny", [], {}, "")
                    with contextlib.suppress(DriverError):
                        self._kill(stale, grace=1.0)
                    shutil.rmtree(d, ignore_errors=True)
                continue
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                used.add(Path(json.loads((d / "template.json").read_text())["memory"]))
        building = tuple(f"-{b[len('.b-'):]}.mem" for b in self._building)
        for f in self.shm_dir.iterdir() if self.shm_dir.is_dir() else ():
            if f not in used and not f.name.endswith(building or ("\0",)):
                f.unlink(missing_ok=True)

    async def snapshot(self, server_id: str) -> str:
        """Copy the VM for ``fork live``: its state with all its RAM (QMP
        ``migrate`` to a file while it runs; it pauses for the last pass)
        and, while it is paused, its scratch disk; then it runs on.  While
        it is copied its status stays ``running``.  EOPNOTSUPP for a VM on
        networks besides ``user`` (the copy would hold the parent's
        addresses) or of an image with a disk (its changes are in a
        temporary overlay); EBUSY while it is being copied; EAGAIN with
        SNAPSHOT_MAX snapshots held or when its state passes its RAM plus
        half STATE_SLACK; ENOSPC without room for the copy (its whole
        scratch disk, its RAM and STATE_SLACK: cloudfs.drivers.scratchroom);
        DriverError if it has exited."""
        vm = await trio.to_thread.run_sync(self._vm, server_id)
        if vm.nets or vm.networks != [USER_NET.name]:
            raise DriverError("fork live copies only VMs on the user network alone", errno=errno.EOPNOTSUPP)
        img = await trio.to_thread.run_sync(imagestore.get_image, self.state_dir, vm.image)
        if img is None:
            raise NotFound(f"no image {vm.image!r}")
        if img.disk is not None:
            raise DriverError(f"fork live cannot copy a VM of image {vm.image} (it has a disk)",
                              errno=errno.EOPNOTSUPP)
        return await trio.to_thread.run_sync(self._snapshot, vm)

    def _snapshot(self, vm: _Vm) -> str:
        with self._moving_lock:
            if vm.id in self._moving:
                raise DriverError(f"server {vm.id} is being copied already", errno=errno.EBUSY)
            self.snapshots_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if len(list(self.snapshots_dir.iterdir())) >= qemusnap.SNAPSHOT_MAX:
                raise DriverError(f"{qemusnap.SNAPSHOT_MAX} fork live copies are waiting to start; try again",
                                  errno=errno.EAGAIN)
            sid = qemusnap.new_snapshot_id()
            d = self.snapshots_dir / sid
            d.mkdir(mode=0o700)
            self._moving.add(vm.id)
        try:
            if vm.pid() is None:
                raise DriverError(f"server {vm.id} has exited ({vm.exit_message()})")
            st = qmp_command(vm.qmp, "query-status", timeout=3.0)
            running = isinstance(st, dict) and st.get("status") == "running"
            if not running:
                raise DriverError(f"server {vm.id} is not running: only a running VM is copied", errno=errno.EBUSY)
            t0 = time.monotonic()
            # The copy's disk is owed its whole size (its child's scratch
            # disk), its state at most the RAM and the device state: save_state
            # finishes early, or else cancels, the save of a guest that
            # rewrites its memory faster than it is saved.
            ram = FLAVORS.get(vm.flavor, (1024, 1))[0] << 20
            need = (SCRATCH_GIB.get(vm.flavor, 1) << 30) + ram + STATE_SLACK
            with self._room.claim(need, f"a fork live copy of {vm.id}", d / "scratch.img"):
                try:
                    info = save_state(vm.qmp, d / "state", limit=ram + STATE_SLACK // 2)
                    p = subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(vm.scratch),
                                        str(d / "scratch.img")], capture_output=True, timeout=300)
                    if p.returncode != 0:
                        raise DriverError(f"copying the scratch disk: {p.stderr.decode(errors='replace').strip()}")
                finally:
                    if running:
                        try:
                            qmp_command(vm.qmp, "cont")
                        except QmpError as e:
                            log.warning("%s: cannot resume after copying it: %s", vm.id, e)
            paused_ms = info.get("downtime") if isinstance(info, dict) else None
            qemusnap.write_json(d / "meta.json", qemusnap.SnapshotMeta(
                self.bound(), vm.id, vm.image, vm.flavor, vm.accel, time.time()).to_dict())
            log.info("fork live: copied %s as %s in %.2f s (downtime %s ms)", vm.id, sid,
                     time.monotonic() - t0, paused_ms)
            return sid
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
        finally:
            with self._moving_lock:
                self._moving.discard(vm.id)

    # -- moves between daemons (cloudfs.moves) -------------------------------------

    async def move_spec(self, server_id: str) -> dict:
        """What the daemon a VM moves to needs to start its QEMU: image,
        flavor, accel, name, running.  EOPNOTSUPP for a VM on networks
        besides ``user`` or of an image with a disk (as for fork live).
        (The scratch disk moves with it: :meth:`scratch_out`.)"""
        vm = await trio.to_thread.run_sync(self._vm, server_id)
        if vm.nets or vm.networks != [USER_NET.name]:
            raise DriverError("migrate moves only VMs on the user network alone", errno=errno.EOPNOTSUPP)
        img = await trio.to_thread.run_sync(imagestore.get_image, self.state_dir, vm.image)
        if img is None or img.disk is not None:
            raise DriverError(f"migrate cannot move a VM of image {vm.image} (missing, or it has a disk)",
                              errno=errno.EOPNOTSUPP)
        st = await trio.to_thread.run_sync(self._server, vm)
        return {"image": vm.image, "flavor": vm.flavor, "accel": vm.accel, "name": vm.name,
                "running": st.status == "running"}

    def scratch_out(self, server_id: str) -> tuple[int, list[tuple[int, int]]]:
        """Blocking: a read-only descriptor of the scratch disk of
        ``server_id`` (the caller closes it) and its data extents
        (``[(offset, length)]``, bytes: what the guest wrote; the rest
        reads as zeros).  For a move, once :meth:`migrate_out` returned and
        the VM is paused: its disk no longer changes.  DriverError if the
        file cannot be read."""
        vm = self._vm(server_id)
        try:
            fd = os.open(vm.scratch, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise DriverError(f"opening the scratch disk of {vm.id}: {e.strerror}") from e
        try:
            return fd, data_extents(fd)
        except OSError as e:
            os.close(fd)
            raise DriverError(f"listing the scratch disk of {vm.id}: {e.strerror}") from e

    def scratch_in(self, server_id: str) -> tuple[int, int]:
        """Blocking: a write-only descriptor of the scratch disk of the
        incoming copy ``server_id`` (:meth:`incoming_start`; the caller
        closes it) and that disk's size in bytes, for the data of the VM's
        disk on the other host.  Its QEMU waits paused and does no I/O
        meanwhile.  The disk is the fresh one :meth:`incoming_start` made
        (all holes), so what the sender leaves out reads as zeros.  (Not
        emptied here: QEMU reads the file's length when it has loaded the
        state, and must not see it shrunk.)  NotFound unless ``server_id``
        is an incoming copy; DriverError if the file cannot be opened."""
        vm = self._load(server_id)
        if vm is None or not self.ours(vm.metadata) or "incoming" not in vm.metadata:
            raise NotFound(f"no incoming server {server_id!r}")
        try:
            fd = os.open(vm.scratch, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise DriverError(f"opening the scratch disk of {vm.id}: {e.strerror}") from e
        return fd, os.fstat(fd).st_size

    def mark_moving(self, server_id: str) -> None:
        """Blocking: ``server_id`` is about to move (``STATE/vms/<id>/moving``,
        so a daemon restarted mid-move knows a paused VM is a move's, not a
        copy's); until :meth:`resume` or :meth:`end_moved` its status stays
        ``running`` while the move pauses it.  EBUSY while it is being
        copied or moved already."""
        vm = self._vm(server_id)
        with self._moving_lock:
            if vm.id in self._moving:
                raise DriverError(f"server {vm.id} is being copied or moved already", errno=errno.EBUSY)
            self._moving.add(vm.id)
        try:
            (vm.dir / "moving").touch(mode=0o600)
        except OSError as e:
            with self._moving_lock:
                self._moving.discard(vm.id)
            raise DriverError(f"marking {vm.id} as moving: {e}") from e

    def migrate_out(self, server_id: str, fd: int, timeout: float = 120.0) -> dict:
        """Blocking: send the VM's state and RAM to ``fd`` (QMP ``migrate``;
        the caller relays it to the other host; the VM is marked with
        :meth:`mark_moving`) and return ``query-migrate``'s answer once
        done: the VM is then paused (``postmigrate``).  QmpError if the
        migration fails (QEMU resumes the VM)."""
        vm = self._vm(server_id)
        if vm.pid() is None:
            raise DriverError(f"server {vm.id} has exited ({vm.exit_message()})")
        return save_state(vm.qmp, None, timeout=timeout, fd=fd)

    def resume(self, server_id: str) -> None:
        """Blocking: the move of ``server_id`` (marked by :meth:`mark_moving`)
        was given up: it runs on here (``cont`` if the move paused it)."""
        vm = self._vm(server_id)
        try:
            if (vm.dir / "moving").exists() and vm.pid() is not None:
                st = qmp_command(vm.qmp, "query-status", timeout=3.0)
                if isinstance(st, dict) and st.get("status") in ("postmigrate", "finish-migrate"):
                    qmp_command(vm.qmp, "cont")
            (vm.dir / "moving").unlink(missing_ok=True)
        finally:
            with self._moving_lock:
                self._moving.discard(vm.id)

    def resume_left(self, server_id: str) -> None:
        """Blocking: resume ``server_id`` if a move of an earlier run of this
        daemon left it paused (its ``moving`` mark is there and nobody here
        moves it); for a caller that knows the move did not land (the
        record names this VM)."""
        vm = self._vm(server_id)
        with self._moving_lock:
            if vm.id in self._moving or not (vm.dir / "moving").exists():
                return
            self._moving.add(vm.id)
        log.info("%s: resuming it after a move cut short", vm.id)
        self.resume(server_id)

    def end_moved(self, server_id: str) -> None:
        """Blocking: the VM now runs on the other host: end this copy."""
        try:
            vm = self._vm(server_id)
        except NotFound:
            return
        try:
            self._remove(vm)
        finally:
            with self._moving_lock:
                self._moving.discard(vm.id)

    def resume_copied(self) -> int:
        """Blocking: resume this deployment's VMs a fork live copy left
        paused (``postmigrate`` without a ``moving`` mark: the daemon died
        while copying; only running VMs are copied).  How many."""
        n = 0
        for d in self.vms_dir.iterdir() if self.vms_dir.is_dir() else ():
            vm = _Vm.load(d)
            if vm is None or not self.ours(vm.metadata) or (d / "moving").exists() or vm.pid() is None:
                continue
            with self._moving_lock:
                if vm.id in self._moving:
                    continue
            try:
                st = qmp_command(vm.qmp, "query-status", timeout=3.0)
                if isinstance(st, dict) and st.get("status") == "postmigrate":
                    log.info("%s: resuming it after a fork live copy cut short", vm.id)
                    qmp_command(vm.qmp, "cont")
                    n += 1
            except QmpError as e:
                log.info("%s: %s", vm.id, e)
        return n

    def incoming_start(self, pid: int, ppid: int, spec: dict, userdata: bytes, fd: int) -> str:
        """Blocking: start a paused QEMU (``-S``) for process ``pid`` that
        takes a moved VM's state from ``fd`` (QMP ``migrate-incoming``);
        returns its server id.  Its meta.json says ``incoming`` until
        :meth:`incoming_commit`: :meth:`incoming_vms` lists it for a daemon
        that restarts meanwhile.  NotFound for an unknown image or flavor;
        DriverError without room for its scratch disk (as for create)."""
        image, flavor, accel = spec["image"], spec["flavor"], spec["accel"]
        img = imagestore.get_image(self.state_dir, image)
        if img is None or flavor not in FLAVORS or accel not in ("tcg", "kvm"):
            raise NotFound(f"no image {image!r}, flavor {flavor!r} or accelerator {accel!r} here")
        vid = new_server_id()
        vm = _Vm(id=vid, dir=self.vms_dir / vid, name=str(spec.get("name", f"p{pid}"))[:63], image=image,
                 flavor=flavor, networks=[USER_NET.name],
                 metadata={**server_metadata(self.bound(), pid, ppid, self.deployment_root), "incoming": "1"},
                 created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), accel=accel)
        with self._room.claim(SCRATCH_GIB.get(flavor, 1) << 30, f"a moved {flavor} VM's scratch disk", vm.scratch):
            vm.dir.mkdir(mode=0o700)
            try:
                self._write_fw(vm, userdata)
                self._write_meta(vm)
                self._launch(vm, img, initrd=img.initramfs, incoming_fd=fd)
            except BaseException:
                with contextlib.suppress(DriverError):
                    self._kill(vm)
                shutil.rmtree(vm.dir, ignore_errors=True)
                raise
        return vid

    def incoming_wait(self, server_id: str, timeout: float = 120.0) -> None:
        """Blocking: until the incoming state is loaded (QEMU paused);
        QmpError if loading failed (QEMU ended) or took too long."""
        vm = self._load(server_id)
        if vm is None:
            raise NotFound(f"no server {server_id!r}")
        deadline = time.monotonic() + timeout
        while True:
            try:
                st = qmp_command(vm.qmp, "query-status", timeout=5.0)
            except QmpError as e:
                if vm.pid() is not None:
                    raise
                log.info("%s: %s", vm.id, e)  # QEMU exits when the state does not load
                raise QmpError("loading the moved VM failed: its QEMU ended") from None
            status = st.get("status") if isinstance(st, dict) else None
            if status in ("paused", "prelaunch", "running"):
                return
            if status != "inmigrate":
                raise QmpError(f"loading the moved VM: QEMU is {status}")
            if time.monotonic() > deadline:
                raise QmpError(f"loading the moved VM took more than {timeout:g} s")
            time.sleep(0.01)

    async def incoming_commit(self, server_id: str, run: bool) -> None:
        """The move is recorded: ``server_id`` is the process's VM now
        (meta.json without ``incoming``); ``run``: let it run."""
        def commit() -> None:
            vm = self._vm(server_id)
            vm.metadata.pop("incoming", None)
            self._write_meta(vm)
            if run:
                qmp_command(vm.qmp, "cont")

        await trio.to_thread.run_sync(commit)
        self._poke_channels()

    def incoming_abort(self, server_id: str) -> None:
        """Blocking: the move was given up: end and remove ``server_id``."""
        vm = self._load(server_id)
        if vm is not None and self.ours(vm.metadata):
            self._remove(vm)

    def local_vms(self) -> list[tuple[str, int]]:
        """Blocking: ``(server id, pid)`` of this deployment's VMs here
        (not counting copies whose move here is not recorded yet)."""
        out = []
        for d in self.vms_dir.iterdir() if self.vms_dir.is_dir() else ():
            vm = _Vm.load(d)
            if vm is not None and self.ours(vm.metadata) and not vm.metadata.get("incoming"):
                pid = parse_pid(vm.metadata.get(META_PID, ""))
                if pid is not None:
                    out.append((vm.id, pid))
        return out

    def incoming_vms(self) -> list[tuple[str, int]]:
        """Blocking: ``(server id, pid)`` of this deployment's VMs whose move
        here was not committed yet (a daemon restarted mid-move)."""
        out = []
        for d in self.vms_dir.iterdir() if self.vms_dir.is_dir() else ():
            vm = _Vm.load(d)
            if vm is not None and self.ours(vm.metadata) and vm.metadata.get("incoming"):
                pid = parse_pid(vm.metadata.get(META_PID, ""))
                if pid is not None:
                    out.append((vm.id, pid))
        return out

    def _write_meta(self, vm: _Vm) -> None:
        tmp = vm.dir / "meta.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(vm.to_json())
        os.replace(tmp, vm.dir / "meta.json")

    async def discard_snapshot(self, snapshot_id: str) -> None:
        """Remove snapshot ``snapshot_id`` (nothing for a malformed id)."""
        if qemusnap.valid_snapshot_id(snapshot_id):
            await trio.to_thread.run_sync(shutil.rmtree, self.snapshots_dir / snapshot_id, True)

    async def _create_from_snapshot(self, spec: ServerSpec) -> Server:
        """Start the ``fork live`` child of ``spec`` from its snapshot, with
        the parent's image, flavor and accelerator and its own identity;
        the snapshot is consumed."""
        if not qemusnap.valid_snapshot_id(spec.snapshot):
            raise DriverError(f"bad snapshot id {spec.snapshot!r}")
        d = self.snapshots_dir / spec.snapshot
        snap = await trio.to_thread.run_sync(qemusnap.load_snapshot, d)
        if snap is None:
            raise DriverError(f"the fork live copy {spec.snapshot} is gone (used, discarded or expired)")
        if snap.deployment != self.bound():
            raise NotOurs(f"snapshot {spec.snapshot} is not deployment {self.deployment}'s")
        img = await trio.to_thread.run_sync(imagestore.get_image, self.state_dir, snap.image)
        if img is None or snap.flavor not in FLAVORS:
            raise NotFound(f"no image {snap.image!r} or flavor {snap.flavor!r} for the copy")
        vid = new_server_id()
        vm = _Vm(id=vid, dir=self.vms_dir / vid, name=spec.name, image=snap.image, flavor=snap.flavor,
                 networks=[USER_NET.name], metadata=self.metadata_for(spec),
                 created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), accel=snap.accel)

        def restore() -> Server:
            # (no room to claim: a copy's disk was admitted, whole, when it was made)
            vm.dir.mkdir(mode=0o700)
            try:
                self._write_fw(vm, spec.userdata)
                self._launch(vm, img, initrd=img.initramfs, state=d / "state", scratch=d / "scratch.img")
            except BaseException:
                with contextlib.suppress(DriverError):
                    self._kill(vm)
                with contextlib.suppress(OSError):  # the snapshot stays whole for a retry
                    self._room.rename(vm.scratch, d / "scratch.img")
                shutil.rmtree(vm.dir, ignore_errors=True)
                raise
            self._write_meta(vm)
            shutil.rmtree(d, ignore_errors=True)
            return Server(vm.id, vm.name, "running", self.host, (GUEST_ADDRESS,))

        server = await trio.to_thread.run_sync(restore)
        self._poke_channels()
        log.info("created %s for pid %d from fork live copy %s", vm.id, spec.pid, spec.snapshot)
        return server

    def servers(self) -> list[Server]:
        """Blocking: every VM directory's server (for tools and tests)."""
        out = []
        for d in sorted(self.vms_dir.iterdir()) if self.vms_dir.is_dir() else ():
            vm = _Vm.load(d)
            if vm is not None:
                out.append(self._server(vm))
        return out

    def kill_all(self) -> int:
        """Blocking: end every VM of this state directory (QMP quit, then
        SIGKILL) and remove them, every network's hub (of any deployment),
        the boot templates and fork live copies; returns how many VM QEMUs were running.  For test
        teardown and ``cloudfs down --vms``-style cleanup."""
        n = 0
        for d in sorted(self.vms_dir.iterdir()) if self.vms_dir.is_dir() else ():
            vm = _Vm.load(d) or _Vm(d.name, d, "", "", "m1.tiny", [], {}, "", "")
            if vm.pid() is not None:
                n += 1
                with contextlib.suppress(DriverError):
                    self._kill(vm, grace=2.0)
            self.logs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                os.replace(vm.console, self.logs_dir / f"{vm.id}.console.log")
            shutil.rmtree(d, ignore_errors=True)
        for d in sorted(self.nets_dir.iterdir()) if self.nets_dir.is_dir() else ():
            net = qemunet.Net.load(d)
            if net is not None:
                qemunet.stop_hub(net, qmp_command)
            shutil.rmtree(d, ignore_errors=True)
        self.remove_templates()
        shutil.rmtree(self.snapshots_dir, ignore_errors=True)
        return n

    def remove_templates(self) -> None:
        """Blocking: end any template being made and remove every boot
        template of this state directory, with its RAM file."""
        for d in sorted(self.templates_dir.iterdir()) if self.templates_dir.is_dir() else ():
            with contextlib.suppress(DriverError):
                self._kill(_Vm(d.name, d, "", "", "m1.tiny", [], {}, ""), grace=1.0)
            self._remove_template(d)
        shutil.rmtree(self.shm_dir, ignore_errors=True)

    def qemu_pid(self, server_id: str) -> int | None:
        """Blocking: the pid of the QEMU running ``server_id`` (None if not running)."""
        vm = self._load(server_id)
        return None if vm is None else vm.pid()

    async def find(self, pid: int) -> list[Server]:
        """The VMs of this deployment whose meta.json tags them with ``pid``,
        running or exited, oldest first."""
        def scan() -> list[Server]:
            return [self._server(vm) for vm in self._ours(pid)]

        return await trio.to_thread.run_sync(scan)

    async def rebuild(self, server_id: str, image: str, userdata: bytes, *, secret: str = "") -> Server:
        """End QEMU, rewrite the initramfs from ``image`` and ``userdata``
        (same id and metadata; ``secret`` is not used, as for create) and
        boot again in a new network namespace (a new channel)."""
        vm = await trio.to_thread.run_sync(self._vm, server_id)
        img = await trio.to_thread.run_sync(imagestore.get_image, self.state_dir, image)
        if img is None:
            raise NotFound(f"no image {image!r}")

        def again() -> Server:
            self._kill(vm)
            vm.image = image
            self._plug(vm, list(vm.nets))  # fresh ports: a hub port takes one peer
            self._prepare(vm, img, userdata)
            (vm.dir / "meta.json").write_text(vm.to_json())
            self._launch(vm, img)
            try:
                self._connect(vm)
            except BaseException:  # no VM left running cut off its networks
                with contextlib.suppress(DriverError):
                    self._kill(vm)
                raise
            return Server(vm.id, vm.name, "running", self.host, (GUEST_ADDRESS, *vm.nets.values()))

        server = await trio.to_thread.run_sync(again)
        self._poke_channels()
        return server

    async def delete(self, server_id: str) -> None:
        """End QEMU (QMP quit, SIGKILL after 5 s) and remove the VM directory
        (its console log is kept as ``STATE/logs/<id>.console.log``).  No
        error if it is gone; NotFound (and nothing done) if it is another
        deployment's."""
        try:
            vm = await trio.to_thread.run_sync(self._vm, server_id)
        except NotOurs:
            raise
        except NotFound:
            return

        await trio.to_thread.run_sync(self._remove, vm)

    async def _power(self, server_id: str, command: str) -> Server:
        vm = await trio.to_thread.run_sync(self._vm, server_id)

        def act() -> Server:
            if vm.pid() is None:
                raise DriverError(f"server {server_id} has exited ({vm.exit_message()})")
            qmp_command(vm.qmp, command)
            return self._server(vm)

        return await trio.to_thread.run_sync(act)

    async def stop(self, server_id: str) -> Server:
        """Pause the vCPUs (QMP ``stop``): status ``stopped``."""
        return await self._power(server_id, "stop")

    async def start(self, server_id: str) -> Server:
        """Resume the vCPUs (QMP ``cont``): status ``running``."""
        return await self._power(server_id, "cont")

    async def status(self, server_id: str) -> Server:
        """The VM now: ``running``/``stopped`` (QMP query-status), ``exited``
        (QEMU is gone; the message is the guest's ``cloudfs-exit`` line and
        where its console is kept) or ``error``.  NotFound if there is no
        such VM directory."""
        vm = await trio.to_thread.run_sync(self._vm, server_id)
        s = await trio.to_thread.run_sync(self._server, vm)
        if s.status == "exited":
            s = dataclasses.replace(s, message=f"{s.message} (console: {self.console_path(vm.id)})")
        return s

    async def stats(self, server_id: str) -> ServerStats:
        """One sample: vCPU time (QMP ``query-cpus-fast`` thread ids, their
        utime+stime in /proc), memory given (the flavor) and used (the
        guest's virtio-balloon statistics, once its driver reported), block
        counters (QMP ``query-blockstats``, all disks), uptime (QEMU's start
        time).  No network counters: QMP has none for user-mode networking.
        NotFound if there is no such VM."""
        vm = await trio.to_thread.run_sync(self._vm, server_id)
        return await trio.to_thread.run_sync(self._stats, vm)

    def _stats(self, vm: _Vm) -> ServerStats:
        memory = FLAVORS.get(vm.flavor, next(iter(FLAVORS.values())))[0] << 20
        pid = vm.pid()
        if pid is None:
            return ServerStats(memory_bytes=memory)
        out: dict[str, int | None] = {"memory_bytes": memory, "uptime_s": _uptime(pid)}
        with contextlib.suppress(QmpError):
            cpus = qmp_command(vm.qmp, "query-cpus-fast", timeout=3.0)
            tids = [c.get("thread-id") for c in cpus if isinstance(c, dict)] if isinstance(cpus, list) else []
            ticks = [_task_ticks(pid, t) for t in tids if isinstance(t, int)]
            if ticks and None not in ticks:
                out["cpu_ns"] = sum(ticks) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        with contextlib.suppress(QmpError):
            blocks = qmp_command(vm.qmp, "query-blockstats", timeout=3.0)
            if isinstance(blocks, list) and blocks:
                for key, field_ in (("rd_bytes", "block_read_bytes"), ("wr_bytes", "block_write_bytes"),
                                    ("rd_operations", "block_read_ops"), ("wr_operations", "block_write_ops")):
                    vals = [b.get("stats", {}).get(key) for b in blocks if isinstance(b, dict)]
                    if vals and all(isinstance(v, int) for v in vals):
                        out[field_] = sum(vals)
        with contextlib.suppress(QmpError):
            got = qmp_command(vm.qmp, "qom-get", {"path": "/machine/peripheral/balloon0",
                                                   "property": "guest-stats"}, timeout=3.0)
            st = got.get("stats", {}) if isinstance(got, dict) else {}
            total, avail = st.get("stat-total-memory"), st.get("stat-available-memory")
            if isinstance(got, dict) and got.get("last-update") and isinstance(total, int) and isinstance(avail, int) \
                    and 0 <= avail <= total:
                out["memory_used_bytes"] = total - avail
        return ServerStats(**out)

    async def console(self, server_id: str, limit: int) -> bytes:
        """The last ``limit`` bytes of the VM's serial console (what it
        wrote since its last create, at most about 1.5 × CONSOLE_MAX bytes
        kept: the older half of the last cut, then what came since).
        NotFound if there is no such VM."""
        vm = await trio.to_thread.run_sync(self._vm, server_id)
        return await trio.to_thread.run_sync(_console_tail, vm, limit)

    async def run(self) -> None:
        """Forever, once per driver however many daemons share it: serve the
        VMs' channels (:meth:`_serve_channels`) and trim their consoles:
        every CONSOLE_CHECK seconds the console of each VM over CONSOLE_MAX
        bytes is cut to its last half (QEMU appends to the file,
        ``append=on``: its next write lands at the new end; what it writes
        between the copy and the truncation, a few bytes at most, is lost).
        A failure is logged and the next round tries again."""
        if self._running:
            await trio.sleep_forever()
        self._running = True
        try:
            self._stop_building.clear()
            if self.deployment is not None:
                try:
                    await trio.to_thread.run_sync(self.resume_copied)
                except (OSError, DriverError) as e:
                    log.warning("resuming VMs left paused: %s", e)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_channels, nursery)
                nursery.start_soon(self._template_builder)
                swept = -SWEEP_INTERVAL
                while True:
                    try:
                        await trio.to_thread.run_sync(self._trim_consoles)
                        if trio.current_time() - swept >= SWEEP_INTERVAL:
                            swept = trio.current_time()
                            await trio.to_thread.run_sync(self._sweep)
                    except Exception:  # never take the daemon down for this
                        log.exception("trimming consoles, sweeping templates and snapshots")
                    await trio.sleep(CONSOLE_CHECK)
        finally:
            self._stop_building.set()
            self._running = False
            for ch in self._channels.values():
                ch.scope.cancel()
            self._channels.clear()

    def _sweep(self) -> None:
        """Blocking: stale template builds, and snapshots past SNAPSHOT_TTL."""
        self._sweep_templates()
        with self._moving_lock:
            gone = qemusnap.sweep_snapshots(self.snapshots_dir)
        if gone:
            log.info("removed %d fork live copies no create took: %s", len(gone), " ".join(gone))

    def _poke_channels(self) -> None:
        """Have the channel supervisor look at the VMs now (a QEMU started)."""
        self._poke.set()

    def _channel_states(self) -> dict[str, tuple[int, int, int] | None] | None:
        """Blocking: for each VM directory, the channel it should have now:
        ``(pid, QEMU's pid, network namespace inode)`` for a running VM of
        the bound deployment in a namespace of its own; _GONE for a VM that
        is not running, not ours, or shares the daemon's namespace (a QEMU
        from before channels: listening "in" it would take the host's port);
        None where it cannot be told now (a read failed: keep what runs).
        None for all when the VM directory cannot be listed."""
        if self.deployment is None:
            return {}
        try:
            own = os.stat("/proc/self/ns/net").st_ino
            dirs = list(self.vms_dir.iterdir()) if self.vms_dir.is_dir() else []
        except OSError:
            return None
        return {d.name: self._channel_state(d, own) for d in dirs}

    def _channel_state(self, d: Path, own: int) -> tuple[int, int, int] | None:
        try:
            raw = (d / "meta.json").read_bytes()
            qpid = int((d / "qemu.pid").read_text().strip())
            with open(f"/proc/{qpid}/stat", "rb") as f:
                st = f.read()
            with open(f"/proc/{qpid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            ino = os.stat(f"/proc/{qpid}/ns/net").st_ino
        except (FileNotFoundError, ProcessLookupError, ValueError):
            return _GONE
        except OSError:
            return None
        vm = _Vm.parse(d, raw)
        if vm is None or not self.ours(vm.metadata) or st[st.rindex(b")") + 2:][:1] in (b"Z", b"X") or ino == own:
            return _GONE
        pid = parse_pid(vm.metadata.get(META_PID, ""))
        qmp = str(vm.qmp).encode()
        if pid is None or not argv or not Path(argv[0].decode(errors="replace")).name.startswith("qemu-system") \
                or not any(qmp in a for a in argv):
            return _GONE
        return (pid, qpid, ino)

    def _listen(self, vid: str, key: tuple[int, int, int]) -> socket.socket:
        """Blocking: a listener in the namespace of VM ``vid``'s QEMU
        ``key``: the namespace is opened first, then the VM is checked to
        still be that QEMU in that namespace (so a reused pid cannot lead
        elsewhere), then cloudfs.drivers.netns.listen_in enters it by that
        descriptor.  NetnsError otherwise."""
        qpid = key[1]
        fds: list[int] = []
        try:
            try:
                fds.append(os.open(f"/proc/{qpid}/ns/net", os.O_RDONLY | os.O_CLOEXEC))
                if self.rootless:
                    fds.append(os.open(f"/proc/{qpid}/ns/user", os.O_RDONLY | os.O_CLOEXEC))
                own = os.stat("/proc/self/ns/net").st_ino
            except OSError as e:
                raise NetnsError(f"cannot open the namespace of QEMU {qpid}: {e}") from e
            if self._channel_state(self.vms_dir / vid, own) != key or os.fstat(fds[0]).st_ino != key[2]:
                raise NetnsError(f"QEMU {qpid} of {vid} changed while its channel was being made")
            return listen_in(fds[0], GUEST_9P_PORT, userns_fd=fds[1] if self.rootless else None,
                             backlog=CHANNEL_BACKLOG, timeout=CHANNEL_TIMEOUT)
        finally:
            for fd in fds:
                os.close(fd)

    async def _serve_channels(self, nursery: trio.Nursery) -> None:
        """Keep one channel per running VM: for each new QEMU, a task opens a
        listener in its namespace and runs :attr:`channel_handler` on it
        (at most CHANNEL_OPENS listeners being made at once); the channel of
        a VM that ended or was rebuilt (a new QEMU) is cancelled.  A round
        whose listing fails changes nothing; a VM whose state cannot be read
        keeps its channel; a listener that cannot be made is logged and
        tried again after CHANNEL_RETRY seconds."""
        failed: dict[tuple[int, int, int], float] = {}
        limiter = trio.CapacityLimiter(CHANNEL_OPENS)
        while True:
            if self.channel_handler is not None:
                try:
                    states = await trio.to_thread.run_sync(self._channel_states)
                except Exception:  # never take the driver down for this
                    log.exception("listing VMs for their channels")
                    states = None
                if states is not None:
                    for vid, ch in list(self._channels.items()):
                        st = states.get(vid, _GONE)
                        if st is not None and st != ch.key:
                            ch.scope.cancel()
                            del self._channels[vid]
                    now = trio.current_time()
                    live = {k for k in states.values() if k not in (None, _GONE)}
                    for k in [k for k in failed if k not in live]:
                        del failed[k]
                    for vid, key in states.items():
                        if key in (None, _GONE) or vid in self._channels or failed.get(key, 0) > now:
                            continue
                        ch = _Channel(key, trio.CancelScope())
                        self._channels[vid] = ch
                        nursery.start_soon(self._channel, vid, ch, limiter, failed)
            with trio.move_on_after(CHANNEL_CHECK):
                await self._poke.wait()
            self._poke = trio.Event()

    async def _channel(self, vid: str, ch: _Channel, limiter: trio.CapacityLimiter,
                       failed: dict[tuple[int, int, int], float]) -> None:
        pid = ch.key[0]
        with ch.scope:
            try:
                sock = await trio.to_thread.run_sync(self._listen, vid, ch.key, limiter=limiter)
            except Exception as e:  # NetnsError, or anything unexpected: try again later
                if ch.key not in failed:
                    log.warning("no channel for %s (pid %d): %s", vid, pid, e)
                failed[ch.key] = trio.current_time() + CHANNEL_RETRY
            else:
                failed.pop(ch.key, None)
                listener = None
                try:
                    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                    log.info("channel of %s (pid %d) open", vid, pid)
                    handler = self.channel_handler
                    if handler is not None:
                        await handler(pid, listener)
                except Exception:  # the next round opens it again
                    log.exception("channel of %s (pid %d) failed", vid, pid)
                finally:
                    with trio.CancelScope(shield=True):
                        if listener is not None:
                            await listener.aclose()
                        else:
                            sock.close()
        if self._channels.get(vid) is ch:
            del self._channels[vid]

    def _trim_consoles(self) -> None:
        for d in self.vms_dir.iterdir() if self.vms_dir.is_dir() else ():
            try:
                if (d / "console.log").stat().st_size > CONSOLE_MAX:
                    _rotate(d / "console.log", d / "console.log.1", CONSOLE_MAX // 2)
            except OSError:
                continue

    async def list_images(self) -> list[Image]:
        """The image store (STATE/images), by name."""
        stored = await trio.to_thread.run_sync(imagestore.list_images, self.state_dir)
        return [Image(i.id, i.name, "active", i.size, i.format, i.checksum, i.created) for i in stored]

    async def list_flavors(self) -> list[str]:
        """``m1.tiny`` (256 MiB, 1 vCPU; the default) and ``m1.small`` (512 MiB)."""
        return list(FLAVORS)

    # -- networks (cloudfs.drivers.qemunet) -----------------------------------

    def _nets(self) -> list[qemunet.Net]:
        """Blocking: this deployment's networks, by name."""
        out = []
        for d in sorted(self.nets_dir.iterdir()) if self.nets_dir.is_dir() else ():
            net = qemunet.Net.load(d)
            if net is not None and self.ours(net.metadata):
                out.append(net)
        return sorted(out, key=lambda n: n.name)

    def _net(self, name: str) -> qemunet.Net:
        for net in self._nets():
            if net.name == name:
                return net
        raise NotFound(f"no network {name!r}")

    def _net_prefix(self, name: str) -> int:
        return self._net(name).prefixlen()

    def _net_lock(self, name: str) -> threading.Lock:
        """The lock of network ``name``: its meta.json (hosts) and its hub's
        QMP (one client at a time) change under it, from worker threads."""
        with self._nets_lock:
            return self._net_locks.setdefault(name, threading.Lock())

    def _plug(self, vm: _Vm, names: list[str]) -> None:
        """Blocking: an address on each network of ``names`` for ``vm``
        (vm.nets set; its QEMU then listens for the hub, :meth:`_connect`)."""
        for name in names:
            with self._net_lock(name):
                net = self._net(name)
                vm.nets[name] = qemunet.allocate(net, vm.id)
                net.save()
                if qemunet.hub_pid(net) is not None:
                    qemunet.remove_port(net, vm.id, qmp_command)  # an old port's socket and hub netdev
                else:
                    net.port(vm.id).unlink(missing_ok=True)

    def _connect(self, vm: _Vm) -> None:
        """Blocking: the hubs of ``vm``'s networks connect to its running
        QEMU's ports; a hub that is not running (the host rebooted, it
        crashed) is started again and joined to its running VMs first (they
        listen again once their peer is gone).  DriverError if a hub
        refuses or the connection fails."""
        for name in vm.nets:
            with self._net_lock(name):
                net = self._net(name)
                if qemunet.hub_pid(net) is None:
                    self._restart_hub(net, but=vm.id)
                qemunet.add_port(net, vm.id, qmp_command)

    def _restart_hub(self, net: qemunet.Net, but: str = "") -> None:
        """Blocking, under the network's lock: start ``net``'s hub again and
        connect it to the running VMs it has addresses for (but ``but``)."""
        log.warning("the hub of network %s is not running: starting it again", net.name)
        qemunet.start_hub(self.qemu, net)
        for vid in net.hosts:
            vm = self._load(vid)
            if vid != but and vm is not None and vm.pid() is not None:
                try:
                    qemunet.add_port(net, vid, qmp_command)
                except DriverError as e:
                    log.warning("network %s: cannot join %s again: %s", net.name, vid, e)

    def _unplug(self, vm: _Vm) -> None:
        """Blocking: ``vm``'s ports and addresses on its networks, released."""
        for name in list(vm.nets):
            with self._net_lock(name):
                try:
                    net = self._net(name)
                except NotFound:
                    continue
                if qemunet.hub_pid(net) is not None:
                    qemunet.remove_port(net, vm.id, qmp_command)
                net.port(vm.id).unlink(missing_ok=True)
                net.hosts.pop(vm.id, None)
                with contextlib.suppress(OSError):
                    net.save()

    def _network(self, net: qemunet.Net) -> Network:
        return Network(net.id, net.name, net.cidr, "active" if qemunet.hub_pid(net) else "down")

    async def list_networks(self) -> list[Network]:
        """The ``user`` network (QEMU user-mode networking, 10.0.2.0/24, the
        default; every VM has it: its channel), then the layer-2 networks
        made with :meth:`create_network`, by name (status ``down`` if the
        hub is not running)."""
        nets = await trio.to_thread.run_sync(self._nets)
        return [USER_NET] + [await trio.to_thread.run_sync(self._network, n) for n in nets]

    async def create_network(self, name: str, cidr: str | None = None) -> Network:
        """A layer-2 network among this host's VMs: a hub QEMU
        (cloudfs.drivers.qemunet) and a ``cidr`` (None: the first free
        10.42.N.0/24; else an RFC 1918 /16–/29).  DriverError: EEXIST if the
        name is taken, EINVAL for a bad name or cidr, EIO if the hub does
        not start."""
        if not valid_name(name):
            raise DriverError(f"bad network name {name!r}", errno=errno.EINVAL)
        if name == USER_NET.name:
            raise DriverError(f"network {name!r} exists", errno=errno.EEXIST)
        deployment = self.bound()

        def make() -> Network:
            with self._nets_lock:  # one network made at a time: names and cidrs stay unique
                nets = self._nets()
                if any(n.name == name for n in nets):
                    raise DriverError(f"network {name!r} exists", errno=errno.EEXIST)
                taken = [n.cidr for n in nets]
                chosen = qemunet.check_cidr(cidr, taken) if cidr else qemunet.pick_cidr(taken)
                self.nets_dir.mkdir(mode=0o700, exist_ok=True)
                while True:
                    nid = f"net-{uuid.uuid4().hex[:12]}"
                    d = self.nets_dir / f"n-{nid[4:10]}"  # short: the ports' unix socket paths must be
                    try:
                        d.mkdir(mode=0o700)
                        break
                    except FileExistsError:
                        continue
                net = qemunet.Net(name=name, id=nid, cidr=chosen,
                                  created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  metadata={META_DEPLOYMENT: deployment}, dir=d)
                try:
                    net.save()
                    qemunet.start_hub(self.qemu, net)
                except BaseException:
                    qemunet.stop_hub(net, qmp_command)
                    qemunet.remove_dir(net)
                    raise
                return self._network(net)

        created = await trio.to_thread.run_sync(make)
        log.info("created network %s (%s)", name, created.cidr)
        return created

    async def delete_network(self, name: str) -> None:
        """End the network's hub and remove it.  NotFound if there is no
        such network of this deployment; DriverError(EBUSY) while a VM
        holds an address on it (also one being created); DriverError(EINVAL)
        for ``user``."""
        if name == USER_NET.name:
            raise DriverError("the user network is every VM's channel: it cannot be removed", errno=errno.EINVAL)

        def remove() -> None:
            with self._net_lock(name):
                net = self._net(name)
                for vid in list(net.hosts):  # VMs gone without releasing (a daemon killed mid-create)
                    if not (self.vms_dir / vid).exists():
                        net.hosts.pop(vid)
                if net.hosts:
                    raise DriverError(f"network {name!r} is in use by {len(net.hosts)} VM(s)", errno=errno.EBUSY)
                qemunet.stop_hub(net, qmp_command)
                qemunet.remove_dir(net)

        await trio.to_thread.run_sync(remove)
        log.info("deleted network %s", name)
