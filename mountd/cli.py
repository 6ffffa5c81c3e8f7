"""The ``cloudfs`` command: ``cloudfs import|up|ps``.

``cloudfs import DIALSTRING DIR [--aname A] [--uname U] [--version V] [--debug]``
mounts a remote 9P namespace with FUSE (see :mod:`mountd.importer`).
``up`` and ``ps`` are placeholders for the cloudfs daemon and process listing.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["build_parser", "main", "cmd_import", "cmd_up", "cmd_ps"]


def cmd_import(args: argparse.Namespace) -> int:
    """``cloudfs import``: foreground FUSE mount of a 9P server; returns the exit status."""
    import trio

    from ninep.errors import FsError

    from .importer import run_import

    try:
        return trio.run(
            lambda: run_import(
                args.dialstring, args.dir, aname=args.aname, uname=args.uname,
                version=args.version, debug=args.debug,
            )
        )
    except (FsError, OSError, RuntimeError) as e:
        logging.getLogger("cloudfs").error("import %s %s: %s", args.dialstring, args.dir, e)
        return 1


# ---- placeholders: the lead replaces these --------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    """``cloudfs up`` (STUB: the lead fills this in)."""
    raise SystemExit("not yet implemented")


def cmd_ps(args: argparse.Namespace) -> int:
    """``cloudfs ps`` (STUB: the lead fills this in)."""
    raise SystemExit("not yet implemented")


# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with one subparser per command; each sets ``func``."""
    p = argparse.ArgumentParser(prog="cloudfs", description="The cloud as one Plan 9 machine.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    imp = sub.add_parser("import", help="mount a remote 9P namespace with FUSE (foreground)")
    imp.add_argument("dialstring", metavar="DIALSTRING", help="tcp!host!port or unix!/path")
    imp.add_argument("dir", metavar="DIR", help="mount point")
    imp.add_argument("--aname", default="", help="tree to attach (default: the server's default)")
    imp.add_argument("--uname", default=None, help="user name to attach as (default: yours)")
    imp.add_argument("--version", default="9P2000.L", choices=["9P2000.L", "9P2000.u", "9P2000"],
                     help="9P dialect to ask for (default 9P2000.L)")
    imp.add_argument("--debug", action="store_true", help="debug logging and libfuse's request trace")
    imp.set_defaults(func=cmd_import)

    up = sub.add_parser("up", help="run the cloudfs daemon (not yet implemented)")
    up.set_defaults(func=cmd_up)
    ps = sub.add_parser("ps", help="list cloud processes (not yet implemented)")
    ps.set_defaults(func=cmd_ps)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cloudfs`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "debug", False) else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
