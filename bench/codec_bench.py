"""Micro-benchmark of the sans-IO 9P codec (ninep/codec.py).

Run: ``.venv/bin/python bench/codec_bench.py [--number N]``.  Prints, for the
messages on the hot path of a 9P server, the microseconds per ``encode`` and per
``decode`` (timeit, best of 5 repeats), then the server's per-request codec cost
for a getattr round trip: decode(Tgetattr) + encode(Rgetattr).  The target is
well under 10 µs for that pair (the server must do > 10,000 Tgetattr/s on one
connection, leaving most of the 100 µs budget to the event loop and the tree).
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ninep import messages as m  # noqa: E402
from ninep.codec import FrameReader, decode, encode  # noqa: E402
from ninep.messages import NOTAG, Dialect  # noqa: E402
from ninep.qid import QTDIR, QTFILE, Qid  # noqa: E402

L = Dialect.L
QID = Qid(QTFILE, 0, 123456)

CASES: list[tuple[m.Message, Dialect]] = [
    (m.Tversion(NOTAG, 65536, "9P2000.L"), L),
    (m.Tattach(1, 0, m.NOFID, "root", "ctl", 0), L),
    (m.Tgetattr(1, 7, m.P9_GETATTR_BASIC), L),
    (m.Rgetattr(1, 0x7FF, QID, 0o100644, 0, 0, 1, 0, 4096, 4096, 8,
                1_700_000_000, 0, 1_700_000_000, 0, 1_700_000_000, 0, 0, 0, 0, 0), L),
    (m.Twalk(1, 7, 8, ("vm", "alpha", "ctl")), L),
    (m.Rwalk(1, (Qid(QTDIR, 0, 1), Qid(QTDIR, 0, 2), QID)), L),
    (m.Tlopen(1, 8, 0), L),
    (m.Tread(1, 8, 0, 8168), L),
    (m.Rread(1, b"x" * 4096), L),
    (m.Twrite(1, 8, 0, b"start\n"), L),
    (m.Rwrite(1, 6), L),
    (m.Tclunk(1, 8), L),
    (m.Rclunk(1), L),
    (m.Rlerror(1, 2), L),
    (m.Rerror(1, "file does not exist", 2), Dialect.U),
    (m.Rstat(1, m.Stat(0, 0, QID, 0o644, 1, 2, 3, "ctl", "root", "root", "root")), Dialect.P2000),
]


def best(stmt, number: int) -> float:
    """Best-of-5 microseconds per call of ``stmt``."""
    return min(timeit.repeat(stmt, number=number, repeat=5)) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--number", type=int, default=50_000, help="calls per timing (default 50000)")
    n = ap.parse_args().number

    print(f"{'message':<12} {'dialect':<9} {'bytes':>6} {'encode µs':>10} {'decode µs':>10}")
    for msg, dialect in CASES:
        frame = encode(msg, dialect)
        assert decode(frame, dialect) == msg
        enc = best(lambda: encode(msg, dialect), n)
        dec = best(lambda: decode(frame, dialect), n)
        print(f"{type(msg).__name__:<12} {dialect.value:<9} {len(frame):>6} {enc:>10.3f} {dec:>10.3f}")

    tg = encode(CASES[2][0], L)
    rg = CASES[3][0]
    pair = best(lambda: (decode(tg, L), encode(rg, L)), n)
    print(f"\ndecode(Tgetattr) + encode(Rgetattr): {pair:.3f} µs  (target: well under 10 µs)")

    stream = tg * 1000

    def framing():
        r = FrameReader(65536)
        r.feed(stream)
        for f in r.frames():
            decode(f, L)

    per = best(framing, max(1, n // 1000)) / 1000
    print(f"FrameReader + decode per Tgetattr frame (1000 per feed): {per:.3f} µs")


if __name__ == "__main__":
    main()
