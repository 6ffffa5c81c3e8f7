"""The local image store of the QEMU driver: ``STATE/images/<name>/``.

Each image is a directory holding a kernel, an initramfs and (optionally) a
qcow2 disk, described by ``manifest.json``::

    {"id": "tiny-4dc681866209", "name": "tiny", "size": 9587387,
     "format": "kernel+initramfs", "checksum": "<sha256 hex>",
     "created": "2026-11-21T06:24:00Z",
     "kernel": "vmlinuz", "initramfs": "initramfs.cpio.gz", "disk": null}

``size`` is the total bytes of the files, ``checksum`` the sha256 of kernel
bytes then initramfs bytes (then disk bytes), as cloudfs.guestimage computes
it for "tiny".  When the kernel is a bzImage whose payload is an ELF
``vmlinux`` with a PVH entry point (Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY,
as Debian's kernels have), the store also keeps that ``vmlinux``
(``"kernel_pvh": "vmlinux"``): QEMU boots it directly with ``-kernel``,
skipping the firmware's real-mode setup and the in-guest decompression, which
under TCG saves about 2 s of every boot (measured here: 2.0 s instead of
4.4 s from QEMU start to a panic for want of /init).  ``/images`` in the namespace lists this store
(``disk_format`` is ``format``).

:func:`build_image_main` is ``cloudfs image build <name>``: it builds "tiny"
with :func:`cloudfs.guestimage.build_tiny` (Debian packages fetched with
``apt-get download``, cached under ``STATE/cache/guest``) and installs it
here; a second run with unchanged inputs does nothing.  All functions block
(disk I/O, subprocesses): call them from trio via ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import struct
import zlib
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .guestimage import ImageBuildError, TinyImage, build_tiny

__all__ = ["StoredImage", "images_dir", "install_image", "list_images", "get_image", "build_image_main",
           "KNOWN_IMAGES", "pvh_kernel_for", "extract_vmlinux", "has_pvh_note"]

#: Images :func:`build_image_main` knows how to build.
KNOWN_IMAGES = ("tiny",)
FORMAT = "kernel+initramfs"
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}")


@dataclass(frozen=True)
class StoredImage:
    """One image of the store: paths of its files and its manifest fields
    (``size`` bytes, ``created`` ISO 8601 UTC, ``disk`` None without a qcow2)."""

    name: str
    id: str
    size: int
    format: str
    checksum: str
    created: str
    kernel: Path
    initramfs: Path
    disk: Path | None = None
    kernel_pvh: Path | None = None


def images_dir(state_dir: Path) -> Path:
    """``STATE/images``."""
    return Path(state_dir) / "images"


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


#: Xen ELF note type of the 32-bit PVH entry point (xen/include/public/elfnote.h).
_XEN_ELFNOTE_PHYS32_ENTRY = 18


def has_pvh_note(elf: bytes) -> bool:
    """True when the ELF64 image ``elf`` has a ``Xen`` note of type
    XEN_ELFNOTE_PHYS32_ENTRY in a PT_NOTE segment (what QEMU's -kernel looks
    for to boot an ELF kernel through its PVH entry point)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    e_phoff, = struct.unpack_from("<Q", elf, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(e_phnum):
        base = e_phoff + i * e_phentsize
        p_type, = struct.unpack_from("<I", elf, base)
        if p_type != 4:  # PT_NOTE
            continue
        off, = struct.unpack_from("<Q", elf, base + 8)
        size, = struct.unpack_from("<Q", elf, base + 32)
        pos, end = off, off + size
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF ``vmlinux`` inside a bzImage (xz or gzip payload, found by its
    magic as the kernel's scripts/extract-vmlinux does), or None."""
    for magic, decompress in ((b"\xfd7zXZ\x00", lambda b: lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(b)),
                              (b"\x1f\x8b\x08", lambda b: zlib.decompressobj(31).decompress(b))):
        start = 0
        while (i := bzimage.find(magic, start)) >= 0:
            start = i + 1
            try:
                out = decompress(bzimage[i:])
            except (lzma.LZMAError, zlib.error, EOFError):
                continue
            if out[:4] == b"\x7fELF":
                return out
    return None


def pvh_kernel_for(kernel: Path) -> Path | None:
    """``vmlinux`` next to ``kernel`` (made once, atomically) when the bzImage
    holds a PVH-bootable ELF kernel; else None.  Blocks (about a second)."""
    out = kernel.with_name("vmlinux")
    if out.is_file():
        return out
    elf = extract_vmlinux(kernel.read_bytes())
    if elf is None or not has_pvh_note(elf):
        return None
    tmp = out.with_name(f"vmlinux.{os.getpid()}.tmp")
    tmp.write_bytes(elf)
    os.replace(tmp, out)
    return out


def install_image(state_dir: Path, image: TinyImage) -> StoredImage:
    """Put a built TinyImage into the store as ``image.name`` (hard links when
    possible, else copies), with its PVH ``vmlinux`` when the kernel has one
    (:func:`pvh_kernel_for`).  Unchanged (same checksum) images are left alone.
    Returns the stored image.  Raises OSError."""
    d = images_dir(state_dir) / image.name
    pvh = pvh_kernel_for(Path(image.kernel))
    current = get_image(state_dir, image.name)
    if current is not None and current.checksum == image.checksum and (current.kernel_pvh is None) == (pvh is None):
        return current
    d.mkdir(parents=True, exist_ok=True)
    _link_or_copy(image.kernel, d / "vmlinuz")
    _link_or_copy(image.initramfs, d / "initramfs.cpio.gz")
    if pvh is not None:
        _link_or_copy(pvh, d / "vmlinux")
    manifest = {
        "id": image.id, "name": image.name, "size": image.size, "format": FORMAT,
        "checksum": image.checksum, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernel": "vmlinuz", "initramfs": "initramfs.cpio.gz", "disk": None,
        "kernel_pvh": "vmlinux" if pvh is not None else None,
        "kernel_release": image.kernel_release,
    }
    tmp = d / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, d / "manifest.json")
    got = get_image(state_dir, image.name)
    assert got is not None
    return got


def _name_ok(name: object) -> bool:
    """An image or file name of the store: 1–63 of ``[A-Za-z0-9._-]``, not
    starting with a dot (no path, no ``..``)."""
    return isinstance(name, str) and bool(_NAME.fullmatch(name))


def _inside(d: Path, name: object) -> Path:
    """The file ``name`` of image directory ``d``; ValueError unless it is a
    plain file name there (a manifest is input: never an absolute path, a
    ``..`` or a link out of the store)."""
    if not _name_ok(name):
        raise ValueError(f"bad file name {name!r} in the manifest of {d}")
    p = d / str(name)
    if p.is_symlink() or p.resolve().parent != d.resolve():
        raise ValueError(f"{p} is not a file of its image directory")
    return p


def get_image(state_dir: Path, name: str) -> StoredImage | None:
    """The stored image ``name``, or None if missing, its files are gone,
    the name is not a plain image name, or its manifest names anything but
    plain files of its own directory (what comes from ZooKeeper or a
    manifest is input: never a path the daemon would boot from elsewhere)."""
    if not _name_ok(name):
        return None
    d = images_dir(state_dir) / name
    try:
        if d.is_symlink() or not d.is_dir():
            return None
        m = json.loads((d / "manifest.json").read_text())
        kernel, initramfs = _inside(d, m["kernel"]), _inside(d, m["initramfs"])
        disk = _inside(d, m["disk"]) if m.get("disk") else None
        pvh = _inside(d, m["kernel_pvh"]) if m.get("kernel_pvh") else None
        if not kernel.is_file() or not initramfs.is_file() or (disk is not None and not disk.is_file()):
            return None
        if m["name"] != name or not all(isinstance(m[k], str) for k in ("id", "format", "checksum", "created")):
            return None  # a copy of another image's directory, or a manifest cloudfs did not write
        return StoredImage(name=m["name"], id=m["id"], size=int(m["size"]), format=m["format"],
                           checksum=m["checksum"], created=m["created"], kernel=kernel,
                           initramfs=initramfs, disk=disk, kernel_pvh=pvh if pvh and pvh.is_file() else None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_images(state_dir: Path) -> list[StoredImage]:
    """Every intact image of the store, sorted by name."""
    root = images_dir(state_dir)
    if not root.is_dir():
        return []
    out = [get_image(state_dir, d.name) for d in sorted(root.iterdir()) if d.is_dir()]
    return [i for i in out if i is not None]


def build_image_main(name: str, state_dir: Path) -> int:
    """``cloudfs image build <name>``: build image ``name`` into the store of
    ``state_dir``, printing progress lines; returns the exit status (0 ok,
    1 build failure, 2 unknown image).  Cached: unchanged inputs rebuild
    nothing."""
    if name not in KNOWN_IMAGES:
        print(f"cloudfs image build: unknown image {name!r} (known: {', '.join(KNOWN_IMAGES)})", file=sys.stderr)
        return 2
    state_dir = Path(state_dir)
    try:
        built = build_tiny(state_dir / "cache" / "guest", progress=lambda line: print(line, flush=True))
        stored = install_image(state_dir, built)
    except (ImageBuildError, OSError) as e:
        print(f"cloudfs image build {name}: {e}", file=sys.stderr)
        return 1
    print(f"image {stored.name}: id {stored.id}, {stored.size} bytes, {stored.format}, "
          f"in {images_dir(state_dir) / stored.name}", flush=True)
    return 0
