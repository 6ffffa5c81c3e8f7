"""The guest image "tiny": a Debian kernel plus a busybox initramfs, built and cached.

cloudfs boots Linux guests under QEMU.  The smallest useful guest is a stock
Debian kernel (``linux-image-amd64``'s versioned dependency, e.g.
``linux-image-6.1.0-56-amd64``) and an initramfs holding only static busybox
(``busybox-static``), the kernel modules for 9P over TCP and virtio networking,
and an ``/init`` shell script.  The guest reaches the host only through QEMU
user networking (10.0.2.15/24, gateway 10.0.2.2: cloudfs VMs find their
channel there, cloudfs.drivers.netns; test guests use ``guestfwd`` rules).

Building never installs anything on the host: ``apt-get download`` fetches the
``.deb`` files into the cache, ``dpkg -x`` unpacks them there, and the initramfs
is written by this module as a gzip'ed ``newc`` cpio archive (the format the
kernel unpacks, Documentation/driver-api/early-userspace/buffer-format.rst).
Module dependencies come from each module's ``.modinfo`` ELF section
(``depends=``), because the Debian package ships no ``modules.dep`` (depmod
makes it at install time).

The guest's /init (see :data:`INIT_SCRIPT`) reads ``cloudfs.mode`` from the
kernel command line: ``cloudfs.mode=shell`` runs a shell on ttyS0 for test
harnesses (tests/guest.py); anything else runs ``/etc/cloudfs/boot`` if present
and powers off.  :func:`append_files` adds per-VM files (e.g.
``/etc/cloudfs/boot``) by concatenating a second cpio archive, which the kernel
unpacks over the first, so the base image never needs rebuilding for them.

All functions here block (subprocesses, disk I/O); call them from trio through
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterable

__all__ = [
    "ImageBuildError",
    "TinyImage",
    "build_tiny",
    "append_files",
    "write_cpio",
    "module_closure",
    "INIT_SCRIPT",
    "ROOT_MODULES",
]

#: Bumped when the build procedure changes in a way that changes the output.
_FORMAT = 3

#: Modules the guest needs; their ``depends=`` closure is added automatically.
#: 9p (the filesystem), 9pnet_fd (``trans=tcp``), virtio_net + virtio_pci (the
#: NIC), virtio_blk (the scratch disk), virtio_balloon (memory statistics),
#: qemu_fw_cfg (the VM's identity, read again by a restored copy).
ROOT_MODULES: tuple[str, ...] = ("9p", "9pnet_fd", "virtio_net", "virtio_pci", "virtio_blk", "virtio_balloon",
                                 "qemu_fw_cfg")

#: The guest's /init, a POSIX sh script run by busybox as PID 1.
INIT_SCRIPT = r"""#!/bin/busybox sh
# cloudfs "tiny" guest init (PID 1).  Built by cloudfs/guestimage.py.
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt /run /sbin /usr/bin /usr/sbin /root
/bin/busybox --install -s
export PATH=/sbin:/usr/sbin:/bin:/usr/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
exec </dev/console >/dev/console 2>&1

kver=$(uname -r)
while read -r m; do
  [ -n "$m" ] || continue
  insmod "/lib/modules/$kver/$m.ko" || echo "cloudfs-guest: insmod $m failed"
done </etc/cloudfs/modules

hostname cloudfs-guest
ip link set lo up
if ip link set eth0 up 2>/dev/null; then
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2
else
  echo "cloudfs-guest: no eth0"
fi

mode=boot
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    cloudfs.mode=*) mode="${arg#cloudfs.mode=}" ;;
  esac
done

if [ "$mode" = shell ]; then
  # Kernel messages would interleave with command output on the console.
  dmesg -n 1
  while :; do
    # A new session whose controlling tty is ttyS0, so ^C (0x03) on the serial
    # line sends SIGINT to the foreground process group.  No echo and no
    # \n -> \r\n so output is byte-exact for the harness.  The shell reads
    # its commands as a script from the tty, so it is not interactive: no
    # line editing, prompts or job control.
    setsid sh -c 'exec </dev/ttyS0 >/dev/ttyS0 2>&1; stty -echo -onlcr; echo "cloudfs-guest: shell ready"; exec sh /dev/stdin'
    echo "cloudfs-guest: shell exited with $?, restarting"
    sleep 1
  done
fi

if [ -f /etc/cloudfs/boot ]; then
  echo "cloudfs-guest: running /etc/cloudfs/boot"
  sh /etc/cloudfs/boot
  echo "cloudfs-guest: /etc/cloudfs/boot exited with $?"
fi
echo "cloudfs-guest: powering off"
sync
poweroff -f
"""


class ImageBuildError(RuntimeError):
    """Building the guest image failed (apt, dpkg, or a missing kernel file).

    The message names the failing step and includes the tool's stderr.
    """


@dataclasses.dataclass(frozen=True)
class TinyImage:
    """A built "tiny" guest image: what QEMU needs for ``-kernel``/``-initrd``.

    ``kernel`` is the Debian vmlinuz (bzImage); ``initramfs`` a gzip'ed newc
    cpio archive.  ``name`` is ``"tiny"``; ``id`` is ``"tiny-"`` plus the first
    12 hex digits of ``checksum``, the sha256 (hex) of the kernel bytes followed
    by the initramfs bytes; ``size`` is their total size in bytes.
    ``kernel_release`` is ``uname -r`` inside the guest (e.g.
    ``"6.1.0-56-amd64"``) and ``modules`` the module names in load order.
    """

    kernel: Path
    initramfs: Path
    name: str
    id: str
    checksum: str
    size: int
    kernel_release: str = ""
    modules: tuple[str, ...] = ()


# ---------------------------------------------------------------------------
# cpio (newc)


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 0,
                rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One newc cpio entry: 110-byte ASCII header, NUL-terminated name, data, 4-byte padding."""
    bname = name.encode() + b"\0"
    hdr = b"070701" + b"".join(
        b"%08X" % v
        for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(bname), 0)
    )
    out = hdr + bname
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def write_cpio(entries: Iterable[tuple[str, int, bytes | tuple[int, int]]]) -> bytes:
    """Return a gzip'ed newc cpio archive of ``entries``, deterministic bytes.

    Each entry is ``(path, mode, payload)``: ``path`` relative (``"bin/busybox"``,
    no leading slash), ``mode`` a full ``st_mode`` (``stat.S_IFREG | 0o755``,
    ``S_IFDIR``, ``S_IFLNK`` with the target as payload bytes, ``S_IFCHR`` with
    ``(major, minor)`` as payload).  Owner is root, mtime 0, so equal inputs
    give equal bytes.  Format: the kernel's initramfs buffer format (newc,
    "070701" magic, ``TRAILER!!!`` terminator).  Raises ValueError for a path
    that is absolute or empty.
    """
    raw = io.BytesIO()
    ino = 1
    for path, mode, payload in entries:
        if not path or path.startswith("/"):
            raise ValueError(f"cpio path must be relative and non-empty: {path!r}")
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            assert isinstance(payload, tuple)
            raw.write(_cpio_entry(path, mode, b"", ino, rdev=payload))
        else:
            assert isinstance(payload, bytes)
            raw.write(_cpio_entry(path, mode, payload, ino))
        ino += 1
    raw.write(_cpio_entry("TRAILER!!!", 0))
    # 512-byte alignment is conventional for cpio; harmless for the kernel.
    raw.write(b"\0" * (-raw.tell() % 512))
    return gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)


def _parent_dirs(paths: Iterable[str]) -> list[str]:
    """All parent directories of ``paths``, parents first, without duplicates."""
    seen: dict[str, None] = {}
    for p in paths:
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            seen.setdefault("/".join(parts[:i]))
    return list(seen)


def append_files(initramfs: Path, files: dict[str, bytes | str], out: Path) -> Path:
    """Write ``out``: a copy of ``initramfs`` followed by a gzip'ed cpio of ``files``.

    ``files`` maps absolute or relative guest paths (``"/etc/cloudfs/boot"``) to
    contents (``str`` is UTF-8 encoded); each becomes a regular file, mode 0755
    if it starts with ``#!`` else 0644; missing parent directories are created
    (0755).  The kernel unpacks concatenated archives in order, later entries
    replacing earlier ones (buffer-format.rst), so this adds or overrides
    files without rebuilding the base image.  ``out`` is readable by its
    owner only (mode 0600: it may hold a guest's identity), set without
    touching the process's umask, which is every thread's.  Returns
    ``out``.  Raises OSError on I/O failure, ValueError on an empty path.
    """
    norm: dict[str, bytes] = {}
    for path, content in files.items():
        rel = path.lstrip("/")
        if not rel:
            raise ValueError(f"bad guest path {path!r}")
        norm[rel] = content.encode() if isinstance(content, str) else bytes(content)
    entries: list[tuple[str, int, bytes | tuple[int, int]]] = [
        (d, stat.S_IFDIR | 0o755, b"") for d in _parent_dirs(norm)
    ]
    for rel, data in norm.items():
        mode = 0o755 if data.startswith(b"#!") else 0o644
        entries.append((rel, stat.S_IFREG | mode, data))
    extra = write_cpio(entries)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with open(initramfs, "rb") as src, os.fdopen(fd, "wb") as dst:
        os.fchmod(fd, 0o600)  # a tmp left by an earlier run may have another mode
        shutil.copyfileobj(src, dst)
        dst.write(extra)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------
# kernel modules


def _elf_section(data: bytes, wanted: str) -> bytes | None:
    """The bytes of section ``wanted`` of a little-endian ELF64 file, or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    e_shoff, = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def sh(i: int) -> tuple[int, int, int]:
        base = e_shoff + i * e_shentsize
        name, = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, str_off, _ = sh(e_shstrndx)
    target = wanted.encode()
    for i in range(e_shnum):
        name, off, size = sh(i)
        end = data.index(b"\0", str_off + name)
        if data[str_off + name:end] == target:
            return data[off:off + size]
    return None


def _modinfo(ko: Path) -> dict[str, list[str]]:
    """The ``key=value`` strings of a module's ``.modinfo`` section, as key -> values."""
    sec = _elf_section(ko.read_bytes(), ".modinfo") or b""
    info: dict[str, list[str]] = {}
    for item in sec.split(b"\0"):
        if b"=" in item:
            k, v = item.decode(errors="replace").split("=", 1)
            info.setdefault(k, []).append(v)
    return info


def module_closure(moddir: Path, roots: Iterable[str]) -> list[tuple[str, Path]]:
    """Resolve ``roots`` and their ``depends=`` closure to ``(name, path)`` in load order.

    ``moddir`` is ``lib/modules/<release>`` of an unpacked kernel package; names
    use underscores (``"virtio_net"``; a file ``foo-bar.ko`` is module
    ``foo_bar``).  Dependencies come before dependents (the order ``insmod``
    needs; modprobe(8) reads the same information from modules.dep).
    Modules built into the kernel (``modules.builtin``) are skipped.  Raises
    ImageBuildError if a module is neither a file nor built in.
    """
    index: dict[str, Path] = {}
    for ko in (moddir / "kernel").rglob("*.ko"):
        index[ko.stem.replace("-", "_")] = ko
    builtin: set[str] = set()
    bfile = moddir / "modules.builtin"
    if bfile.exists():
        for line in bfile.read_text().split():
            builtin.add(Path(line).stem.replace("-", "_"))
    order: list[tuple[str, Path]] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if state.get(name) == 2 or name in builtin and name not in index:
            return
        if state.get(name) == 1:
            raise ImageBuildError(f"module dependency cycle at {name}")
        if name not in index:
            raise ImageBuildError(f"kernel module {name!r} not found under {moddir}")
        state[name] = 1
        for deps in _modinfo(index[name]).get("depends", []):
            for dep in filter(None, deps.split(",")):
                visit(dep)
        state[name] = 2
        order.append((name, index[name]))

    for r in roots:
        visit(r)
    return order


# ---------------------------------------------------------------------------
# apt helpers


def _run(argv: list[str], cwd: Path | None = None) -> str:
    """Run ``argv``; return stdout; raise ImageBuildError with stderr on failure."""
    try:
        p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise ImageBuildError(f"{argv[0]} not found: {e}") from e
    if p.returncode != 0:
        raise ImageBuildError(
            f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return p.stdout


def _candidate_version(pkg: str) -> str:
    """The candidate version of Debian package ``pkg`` per the local apt lists."""
    out = _run(["apt-cache", "show", "--no-all-versions", pkg])
    m = re.search(r"^Version:\s*(\S+)", out, re.M)
    if not m:
        raise ImageBuildError(f"apt-cache show {pkg}: no Version field")
    return m.group(1)


def _kernel_package() -> str:
    """The versioned kernel package that ``linux-image-amd64`` depends on."""
    out = _run(["apt-cache", "depends", "linux-image-amd64"])
    m = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)\b", out)
    if not m:
        raise ImageBuildError(f"cannot find the kernel package in: {out.strip()}")
    return m.group(1)


def _resolve_packages() -> dict[str, str]:
    """``{"kernel": name, "kernel_version": v, "busybox_version": v}`` from apt lists.

    Runs ``apt-get update`` once if the lists do not know the packages.
    """
    def resolve() -> dict[str, str]:
        kpkg = _kernel_package()
        return {
            "kernel": kpkg,
            "kernel_version": _candidate_version(kpkg),
            "busybox_version": _candidate_version("busybox-static"),
        }
    try:
        return resolve()
    except ImageBuildError:
        _run(["apt-get", "update", "-qq"])
        return resolve()


def _download(pkg: str, version: str, debdir: Path, progress: Callable[[str], object]) -> Path:
    """``apt-get download pkg=version`` into ``debdir`` unless already there; the .deb path."""
    debdir.mkdir(parents=True, exist_ok=True)
    fname_ver = version.replace(":", "%3a")
    for existing in debdir.glob(f"{pkg}_*.deb"):
        if existing.name.startswith(f"{pkg}_{fname_ver}_") or existing.name.startswith(
                f"{pkg}_{version.split(':', 1)[-1]}_"):
            return existing
    progress(f"guestimage: downloading {pkg} {version}")
    try:
        _run(["apt-get", "download", "-q", f"{pkg}={version}"], cwd=debdir)
    except ImageBuildError:
        progress("guestimage: download failed; running apt-get update and retrying")
        _run(["apt-get", "update", "-qq"])
        _run(["apt-get", "download", "-q", f"{pkg}={version}"], cwd=debdir)
    debs = sorted(debdir.glob(f"{pkg}_*.deb"), key=lambda p: p.stat().st_mtime)
    if not debs:
        raise ImageBuildError(f"apt-get download {pkg} produced no .deb in {debdir}")
    return debs[-1]


def _image_from_manifest(cache_dir: Path, m: dict) -> TinyImage | None:
    """The TinyImage a manifest describes, or None if its files are gone or changed."""
    try:
        kernel = cache_dir / m["kernel"]
        initramfs = cache_dir / m["initramfs"]
        if not kernel.is_file() or not initramfs.is_file():
            return None
        size = kernel.stat().st_size + initramfs.stat().st_size
        if size != m["size"]:
            return None
        return TinyImage(kernel=kernel, initramfs=initramfs, name="tiny",
                         id=m["id"], checksum=m["checksum"], size=size,
                         kernel_release=m["kernel_release"], modules=tuple(m["modules"]))
    except (KeyError, TypeError, OSError):
        return None


def build_tiny(cache_dir: Path, progress: Callable[[str], object] = print) -> TinyImage:
    """Build (or reuse from ``cache_dir``) the "tiny" guest image; return it.

    Inputs: the versioned kernel package behind ``linux-image-amd64`` and its
    candidate version, the ``busybox-static`` version, the sha256 of
    :data:`INIT_SCRIPT`, :data:`ROOT_MODULES` and a format number.  They are
    recorded in ``cache_dir/manifest.json``; when they match and the files are
    intact, nothing is downloaded or rebuilt.  Otherwise the two ``.deb``
    files are fetched with ``apt-get download`` into ``cache_dir/debs``,
    unpacked with ``dpkg -x`` into a temporary directory under ``cache_dir``
    (nothing is installed on the host), and ``cache_dir/tiny-<id>/vmlinuz`` and
    ``initramfs.cpio.gz`` are written (older ``tiny-*`` directories are
    removed).  If apt's lists are missing,
    ``apt-get update`` runs once (needs root); if apt cannot resolve the
    packages at all, an existing cached image is returned as is.

    Concurrent callers on one ``cache_dir`` are serialized with ``flock(2)``
    on ``cache_dir/.lock``.  ``progress`` receives one human-readable line per
    step.  Blocks (minutes
    on a cold cache, milliseconds warm): call it from trio via
    ``trio.to_thread.run_sync``.  Raises ImageBuildError when a step fails.
    """
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Several test sessions may share one cache: one builder at a time.
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_tiny_locked(cache_dir, progress)


def _build_tiny_locked(cache_dir: Path, progress: Callable[[str], object]) -> TinyImage:
    """:func:`build_tiny` with the cache lock held."""
    manifest_path = cache_dir / "manifest.json"
    old: dict = {}
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            old = {}

    try:
        pkgs = _resolve_packages()
    except ImageBuildError as e:
        cached = _image_from_manifest(cache_dir, old) if old else None
        if cached is not None:
            progress(f"guestimage: apt unavailable ({e}); using cached {cached.id}")
            return cached
        raise
    inputs = {
        "format": _FORMAT,
        **pkgs,
        "init_sha256": hashlib.sha256(INIT_SCRIPT.encode()).hexdigest(),
        "root_modules": list(ROOT_MODULES),
    }
    if old.get("inputs") == inputs:
        cached = _image_from_manifest(cache_dir, old)
        if cached is not None:
            progress(f"guestimage: using cached {cached.id} ({pkgs['kernel']} {pkgs['kernel_version']})")
            return cached

    debdir = cache_dir / "debs"
    kdeb = _download(pkgs["kernel"], pkgs["kernel_version"], debdir, progress)
    bdeb = _download("busybox-static", pkgs["busybox_version"], debdir, progress)

    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="unpack-") as tmp:
        root = Path(tmp)
        progress(f"guestimage: unpacking {kdeb.name}")
        _run(["dpkg", "-x", str(kdeb), str(root / "kernel")])
        progress(f"guestimage: unpacking {bdeb.name}")
        _run(["dpkg", "-x", str(bdeb), str(root / "busybox")])

        vmlinuz = sorted((root / "kernel" / "boot").glob("vmlinuz-*"))
        if len(vmlinuz) != 1:
            raise ImageBuildError(f"expected one vmlinuz in {kdeb.name}, found {vmlinuz}")
        release = vmlinuz[0].name[len("vmlinuz-"):]
        moddir = root / "kernel" / "lib" / "modules" / release
        mods = module_closure(moddir, ROOT_MODULES)
        progress("guestimage: modules " + " ".join(n for n, _ in mods))
        busybox = root / "busybox" / "bin" / "busybox"
        if not busybox.is_file():
            raise ImageBuildError(f"{bdeb.name} has no bin/busybox")

        files: list[tuple[str, int, bytes | tuple[int, int]]] = []
        for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys",
                  "tmp", "mnt", "run", "root", "etc", "etc/cloudfs", "lib", "lib/modules",
                  f"lib/modules/{release}"):
            files.append((d, stat.S_IFDIR | 0o755, b""))
        files.append(("dev/console", stat.S_IFCHR | 0o600, (5, 1)))
        files.append(("dev/null", stat.S_IFCHR | 0o666, (1, 3)))
        files.append(("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()))
        files.append(("bin/sh", stat.S_IFLNK | 0o777, b"busybox"))
        files.append(("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode()))
        files.append(("etc/cloudfs/modules", stat.S_IFREG | 0o644,
                      "".join(n + "\n" for n, _ in mods).encode()))
        files.append(("etc/passwd", stat.S_IFREG | 0o644, b"root:x:0:0:root:/root:/bin/sh\n"))
        files.append(("etc/group", stat.S_IFREG | 0o644, b"root:x:0:\n"))
        for name, path in mods:
            files.append((f"lib/modules/{release}/{name}.ko", stat.S_IFREG | 0o644,
                          path.read_bytes()))
        progress(f"guestimage: packing initramfs ({len(files)} entries)")
        cpio = write_cpio(files)

        checksum = hashlib.sha256(vmlinuz[0].read_bytes() + cpio).hexdigest()
        image_id = "tiny-" + checksum[:12]
        outdir = cache_dir / image_id
        outdir.mkdir(exist_ok=True)
        kernel_out = outdir / "vmlinuz"
        initrd_out = outdir / "initramfs.cpio.gz"
        shutil.copyfile(vmlinuz[0], kernel_out.with_suffix(".tmp"))
        os.replace(kernel_out.with_suffix(".tmp"), kernel_out)
        initrd_out.with_suffix(".tmp").write_bytes(cpio)
        os.replace(initrd_out.with_suffix(".tmp"), initrd_out)

    size = kernel_out.stat().st_size + initrd_out.stat().st_size
    manifest = {
        "inputs": inputs,
        "kernel": str(kernel_out.relative_to(cache_dir)),
        "initramfs": str(initrd_out.relative_to(cache_dir)),
        "id": image_id,
        "checksum": checksum,
        "size": size,
        "kernel_release": release,
        "modules": [n for n, _ in mods],
    }
    tmp_manifest = manifest_path.with_suffix(".tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp_manifest, manifest_path)
    for stale in cache_dir.glob("tiny-*"):
        if stale.is_dir() and stale.name != image_id:
            progress(f"guestimage: removing stale {stale.name}")
            shutil.rmtree(stale, ignore_errors=True)
    progress(f"guestimage: built {image_id} ({size} bytes, kernel {release})")
    return TinyImage(kernel=kernel_out, initramfs=initrd_out, name="tiny", id=image_id,
                     checksum=checksum, size=size, kernel_release=release,
                     modules=tuple(n for n, _ in mods))
