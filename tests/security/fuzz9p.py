"""A 9P fuzzer: random and mutated frames against a 9P server.

Frames come from a corpus of well-formed 9P2000.L requests (encoded with
our own codec: version, attach, walks of real and hostile names, opens,
reads, readdirs, writes, getattr/setattr, creates, clunks, flushes), then
mutated (bit flips, byte runs, truncation, size fields that lie, spliced
frames) or replaced by random bytes.  Each connection sends a Tversion
(mostly), then a burst of frames, and reads whatever comes back for a
moment.  The caller checks the server afterwards (alive, no traceback, a
canary answers).

Used by tests/security/test_fuzz.py (a few thousand frames per CI run) and
for longer runs by hand::

    .venv/bin/python -m tests.security.fuzz9p tcp!127.0.0.1!564 --frames 200000 --seed 7
"""

from __future__ import annotations

import argparse
import random
import struct

import trio

from ninep import messages as m
from ninep.codec import encode
from ninep.dial import dial

D = m.Dialect.L
NAMES = ["proc", "1", "self", "ctl", "status", "env", "wait", "limits", "children", "userdata", "images", "net", "hosts",
         "note", "notepg", "pipe", "p",
         "tiny", "..", ".", "", "٠", "²", "x" * 300, "a\x00b", "\udcff", "9" * 40, "proc/1", "k"]


def corpus(rng: random.Random) -> list[bytes]:
    """Well-formed requests touching every part of the tree."""
    def t() -> int:
        return rng.randrange(0, 64)

    msgs = [
        m.Tattach(tag=t(), fid=1, afid=m.NOFID, uname="root", aname="", n_uname=0),
        m.Tattach(tag=t(), fid=1, afid=m.NOFID, uname="root", aname="proc/1/00", n_uname=0),
        m.Tauth(tag=t(), afid=9, uname="root", aname="", n_uname=0),
        m.Twalk(tag=t(), fid=1, newfid=2, wnames=["proc", "1", "status"]),
        m.Twalk(tag=t(), fid=1, newfid=3, wnames=["proc", "1", "env", "k"]),
        m.Twalk(tag=t(), fid=1, newfid=4, wnames=[rng.choice(NAMES) for _ in range(rng.randrange(0, 17))]),
        m.Twalk(tag=t(), fid=2, newfid=2, wnames=[]),
        m.Tlopen(tag=t(), fid=2, flags=rng.choice([0, 1, 2, 0o4000, 0o200000, 0xFFFFFFFF])),
        m.Tread(tag=t(), fid=2, offset=rng.choice([0, 1, 2**63, 2**64 - 1]), count=rng.choice([0, 1, 8192, 2**32 - 1])),
        m.Treaddir(tag=t(), fid=rng.choice([1, 2, 5]), offset=rng.choice([0, 3, 2**64 - 1]), count=8192),
        m.Twrite(tag=t(), fid=rng.choice([2, 3]), offset=rng.choice([0, 2**40]), data=rng.randbytes(rng.randrange(0, 64))),
        m.Tgetattr(tag=t(), fid=rng.choice([1, 2, 3]), request_mask=0x3FFF),
        m.Tsetattr(tag=t(), fid=2, valid=rng.randrange(0, 2**32), mode=rng.randrange(0, 2**32), uid=0, gid=0,
                   size=rng.choice([0, 2**64 - 1]), atime_sec=2**64 - 1, atime_nsec=2**64 - 1, mtime_sec=0,
                   mtime_nsec=0),
        m.Tlcreate(tag=t(), fid=rng.choice([1, 3]), name=rng.choice(NAMES), flags=0o102, mode=0o644, gid=0),
        m.Tmkdir(tag=t(), dfid=1, name=rng.choice(NAMES), mode=0o755, gid=0),
        m.Tunlinkat(tag=t(), dirfid=1, name=rng.choice(NAMES), flags=rng.choice([0, 0x200])),
        m.Tclunk(tag=t(), fid=rng.randrange(0, 8)),
        m.Tremove(tag=t(), fid=rng.randrange(0, 8)),
        m.Tflush(tag=t(), oldtag=rng.randrange(0, 64)),
        m.Tstatfs(tag=t(), fid=1),
        m.Txattrwalk(tag=t(), fid=1, newfid=6, name="user.x"),
        m.Tversion(tag=m.NOTAG, msize=rng.choice([0, 100, 4096, 2**32 - 1]), version=rng.choice(["9P2000.L", "9P2000", "x"])),
    ]
    out = []
    for msg in msgs:
        try:
            out.append(encode(msg, D))
        except (ValueError, TypeError, OverflowError, UnicodeEncodeError):
            pass
    return out


def mutate(rng: random.Random, frame: bytes) -> bytes:
    """One of several mutations of a frame."""
    b = bytearray(frame)
    kind = rng.randrange(8)
    if kind == 0 and b:  # bit flips
        for _ in range(rng.randrange(1, 6)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 1 and b:  # a run of random bytes
        i = rng.randrange(len(b))
        b[i:i + rng.randrange(1, 16)] = rng.randbytes(rng.randrange(1, 16))
    elif kind == 2 and len(b) > 4:  # truncated, size field unchanged
        b = b[:rng.randrange(4, len(b))]
    elif kind == 3:  # a size field that lies
        b[0:4] = struct.pack("<I", rng.choice([0, 1, 6, 7, len(b) + 1, 2**31, 2**32 - 1, rng.randrange(2**32)]))
    elif kind == 4:  # a string length that lies
        if len(b) > 9:
            i = rng.randrange(7, len(b) - 1)
            b[i:i + 2] = struct.pack("<H", rng.choice([0, 0xFFFF, rng.randrange(2**16)]))
    elif kind == 5:  # a type byte from anywhere
        if len(b) > 4:
            b[4] = rng.randrange(256)
    elif kind == 6:  # random bytes with a plausible header
        body = rng.randbytes(rng.randrange(0, 200))
        b = bytearray(struct.pack("<IBH", 7 + len(body), rng.randrange(256), rng.randrange(2**16)) + body)
    else:  # pure noise
        b = bytearray(rng.randbytes(rng.randrange(1, 300)))
    return bytes(b)


async def one_connection(target: str, rng: random.Random, frames: int, aname: str = "") -> int:
    """Open a connection, (mostly) negotiate, attach, send ``frames`` frames
    and drain replies for a moment; returns how many frames were sent."""
    stream = await dial(target)
    sent = 0
    try:
        if rng.random() < 0.9:
            await stream.send_all(encode(m.Tversion(tag=m.NOTAG, msize=8192 + 24, version="9P2000.L"), D))
            await stream.send_all(encode(m.Tattach(tag=0, fid=1, afid=m.NOFID, uname="root", aname=aname,
                                                   n_uname=0), D))
        base = corpus(rng)
        burst = []
        for _ in range(frames):
            f = rng.choice(base)
            burst.append(f if rng.random() < 0.3 else mutate(rng, f))
        for f in burst:
            await stream.send_all(f)
            sent += 1
        with trio.move_on_after(0.05):
            while await stream.receive_some(65536):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the server closed it: a protocol error is a fine answer
    finally:
        await stream.aclose()
    return sent


async def fuzz(target: str, total: int, seed: int, per_connection: int = 30, aname: str = "") -> int:
    """Send ``total`` frames (those the server took before closing a
    connection count) over connections of up to ``per_connection`` frames
    each, four at a time; returns the frames sent.  A server closes a
    connection at its first malformed frame, so most carry only a few."""
    rng = random.Random(seed)
    sent = 0
    connections = 0
    limiter = trio.CapacityLimiter(4)

    async def one(r: random.Random) -> None:
        nonlocal sent
        try:
            sent += await one_connection(target, r, per_connection, aname)
        finally:
            limiter.release_on_behalf_of(r)

    async with trio.open_nursery() as n:
        while sent < total and connections < total:
            r = random.Random(rng.randrange(2**63))
            await limiter.acquire_on_behalf_of(r)
            connections += 1
            n.start_soon(one, r)
    return sent


def main() -> None:
    ap = argparse.ArgumentParser(description="Random and mutated 9P frames against a server.")
    ap.add_argument("target", help="dial string, e.g. tcp!127.0.0.1!564")
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--aname", default="")
    args = ap.parse_args()
    sent = trio.run(fuzz, args.target, args.frames, args.seed, 30, args.aname)
    print(f"sent {sent} frames to {args.target} (seed {args.seed})")


if __name__ == "__main__":
    main()
