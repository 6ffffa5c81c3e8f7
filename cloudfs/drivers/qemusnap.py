"""Where the QEMU driver keeps boot templates and ``fork live`` snapshots,
and what it trusts of them (layout, keys, validation; no QEMU here: the
driver makes and uses them, cloudfs.drivers.qemu).

Boot templates (snapshot boot)::

    STATE/templates/<image>-<flavor>-<key>/template.json
                                     …/state          the saved VM state (~1 MB)
                                     …/initramfs.cpio.gz
    SHM/<image>-<flavor>-<key>.mem    its RAM (SHM: /dev/shm/cloudfs-<hash of STATE>)

A template is a guest of ``image`` booted once, with RAM in a shared file,
waiting in its boot script for an identity, paused and saved without that
RAM (QEMU's ``x-ignore-shared``).  A new VM maps the RAM file privately
(copy on write: its pages stay shared with every other copy until written)
and loads the state: it runs at once from where the template waited.  The
key hashes everything the saved state depends on (:func:`template_key`):
when any of it changes, the key changes and a new template is made; a
template whose files are missing or malformed is not used.  The RAM file
is never written once saved (copies map it with ``share=off``).

Snapshots (``fork live``)::

    STATE/snapshots/snap-<hex>/meta.json   deployment, parent server, image,
                                           flavor, accel, taken (epoch s)
                              …/state       the parent's state with all its RAM
                              …/scratch.img the parent's scratch disk then

A snapshot is consumed by the create it was taken for, removed by
``discard_snapshot``, and swept after SNAPSHOT_TTL seconds; at most
SNAPSHOT_MAX exist at once per driver.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TEMPLATE_FORMAT", "SNAPSHOT_MAX", "SNAPSHOT_TTL", "TEMPLATE_BOOT_TIMEOUT", "Template", "template_key",
           "template_name", "load_template", "write_json", "SnapshotMeta", "new_snapshot_id", "valid_snapshot_id",
           "load_snapshot", "sweep_snapshots", "shm_dir_for"]

#: Bumped when what a template holds changes in a way no key input shows.
TEMPLATE_FORMAT = 1
#: Seconds a template's guest may take to boot to its wait.
TEMPLATE_BOOT_TIMEOUT = 120.0
#: Snapshots a driver holds at once (each is the parent's RAM in use, tens
#: to hundreds of MB, and its scratch disk's data; the room its whole disk
#: may take is kept for it, cloudfs.drivers.scratchroom): more is EAGAIN.
SNAPSHOT_MAX = 8
#: Seconds after which an unused snapshot is removed (a child whose create
#: never came: its daemon and process gone).
SNAPSHOT_TTL = 3600.0

_SNAP_ID = re.compile(r"snap-[0-9a-f]{16}")


def template_key(parts: dict) -> str:
    """The hex sha256 of ``parts`` (JSON, keys sorted) with TEMPLATE_FORMAT."""
    doc = json.dumps({"format": TEMPLATE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()


def template_name(image: str, flavor: str, key: str) -> str:
    """``<image>-<flavor>-<first 16 hex digits of key>``."""
    return f"{image}-{flavor}-{key[:16]}"


def shm_dir_for(shm: Path, state_dir: Path) -> Path:
    """The directory of one state dir's template RAM files under ``shm``."""
    return shm / f"cloudfs-{hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]}"


def write_json(path: Path, doc: dict) -> None:
    """Write ``doc`` to ``path`` (mode 0600) atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Template:
    """A ready boot template: its directory, key, RAM file and size (MiB)."""

    dir: Path
    key: str
    memory: Path
    mib: int

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def initramfs(self) -> Path:
        return self.dir / "initramfs.cpio.gz"


def load_template(d: Path, key: str) -> Template | None:
    """The template in ``d`` if it is complete and made for ``key``: its
    template.json names the key, and its state and RAM file (of the size
    recorded) exist; else None."""
    try:
        doc = json.loads((d / "template.json").read_text())
        if not isinstance(doc, dict) or doc.get("key") != key:
            return None
        mem, mib = Path(doc["memory"]), doc["mib"]
        if not isinstance(mib, int) or isinstance(mib, bool) or mib <= 0:
            return None
        t = Template(d, key, mem, mib)
        if mem.stat().st_size != mib << 20 or not t.state.is_file() or not t.initramfs.is_file():
            return None
        return t
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class SnapshotMeta:
    """What a snapshot records: the deployment it belongs to, the parent
    server, its image, flavor and accelerator, and when it was taken."""

    deployment: str
    parent: str
    image: str
    flavor: str
    accel: str
    taken: float

    def to_dict(self) -> dict:
        return {"deployment": self.deployment, "parent": self.parent, "image": self.image, "flavor": self.flavor,
                "accel": self.accel, "taken": self.taken}


def new_snapshot_id() -> str:
    """``snap-`` and 16 random hex digits."""
    return "snap-" + os.urandom(8).hex()


def valid_snapshot_id(sid: str) -> bool:
    """Whether ``sid`` is a snapshot id this driver makes (so a path part)."""
    return isinstance(sid, str) and _SNAP_ID.fullmatch(sid) is not None


def load_snapshot(d: Path) -> SnapshotMeta | None:
    """The snapshot in ``d`` if its meta.json, state and scratch disk are
    there and well-formed; else None."""
    try:
        doc = json.loads((d / "meta.json").read_text())
        meta = SnapshotMeta(**{k: doc[k] for k in ("deployment", "parent", "image", "flavor", "accel", "taken")})
        if not all(isinstance(getattr(meta, k), str) for k in ("deployment", "parent", "image", "flavor", "accel")) \
                or not isinstance(meta.taken, (int, float)) or isinstance(meta.taken, bool):
            return None
        if not (d / "state").is_file() or not (d / "scratch.img").is_file():
            return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def sweep_snapshots(snapshots: Path, ttl: float = SNAPSHOT_TTL, now: float | None = None,
                    keep: frozenset[str] = frozenset()) -> list[str]:
    """Remove the snapshots in ``snapshots`` older than ``ttl`` seconds (by
    their directory's mtime), and leftovers that are not snapshots, except
    those named in ``keep`` (being made); returns the names removed."""
    now = time.time() if now is None else now
    gone = []
    try:
        entries = list(os.scandir(snapshots))
    except OSError:
        return gone
    for e in entries:
        if e.name in keep:
            continue
        try:
            old = now - e.stat(follow_symlinks=False).st_mtime > ttl
        except OSError:
            continue
        if old or not valid_snapshot_id(e.name):
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                try:
                    os.unlink(e.path)
                except OSError:
                    continue
            gone.append(e.name)
    return gone
