"""``python -m ninep``: command-line front end of the ninep package.

``python -m ninep serve --listen DIAL --root DIR [--debug-9p] [--msize N]``
serves the directory DIR over 9P (9P2000, 9P2000.u, 9P2000.L) together with
diod's synthetic ``ctl`` tree (aname ``ctl``), so diod's tools (``diodls``,
``diodcat``, ``diodload``, ``dioddate``) and a Linux v9fs mount can be pointed
at it exactly as at diod.  It logs the bound addresses (``listening on
tcp!127.0.0.1!45123``) and exits with status 0 on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from functools import partial
from pathlib import Path

import trio

from .ctlfs import CtlFS
from .localfs import LocalFS
from .mux import AnameMux

log = logging.getLogger("ninep.serve")

DESCRIPTION = """\
Serve a directory over 9P (9P2000, 9P2000.u and 9P2000.L) plus diod's
synthetic "ctl" tree.

Attach names (the aname of Tattach, mount -o aname=…, diod tools' -a):
  ""  or the root's path   the directory --root
  a path inside the root   that subdirectory
  "ctl"                    diod's ctl tree: version, date, zero, zero100,
                           null, null100, meminfo, net.rpc.nfs, exports,
                           connections
All access uses this process's credentials; symbolic links and ".." never
lead outside the root.
"""

EPILOG = """\
dial strings:
  tcp!HOST!PORT     TCP (port 0 picks a free port; see the log for it)
  unix!/PATH        a Unix-domain socket (mode 0600)

examples:
  python -m ninep serve --listen 'tcp!127.0.0.1!5640' --root /srv/export
  diodls -s 127.0.0.1:5640                 # list the ctl tree
  diodcat -s 127.0.0.1:5640 -a /srv/export README
  diodload -s 127.0.0.1:5640 -g -n1 -r2    # getattr load on ctl/null
  mount -t 9p -o trans=tcp,port=5640,version=9p2000.L 127.0.0.1 /mnt
"""


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``python -m ninep`` (subcommand ``serve``)."""
    p = argparse.ArgumentParser(
        prog="python -m ninep",
        description="ninep: a 9P2000/9P2000.u/9P2000.L file server on trio.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser(
        "serve",
        help="serve a directory and the diod ctl tree over 9P",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--listen", required=True, metavar="DIAL",
                   help="where to listen: tcp!HOST!PORT or unix!/PATH")
    s.add_argument("--root", required=True, type=Path, metavar="DIR",
                   help="the directory to serve (aname \"\" or its path)")
    s.add_argument("--msize", type=int, default=None, metavar="N",
                   help="largest 9P message size in bytes offered to clients "
                        "(default: the server's, at least 4096)")
    s.add_argument("--debug-9p", action="store_true",
                   help="log every 9P message (T and R) to stderr")
    s.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="logging level for everything else (default INFO)")
    return p


def _connections_text(server) -> bytes:
    """diod's ``ctl/connections``: one line per connected client."""
    return "".join(f"{getattr(c, 'peer', '?')}\n" for c in list(server.connections)).encode()


async def serve(listen: str, root: Path, *, msize: int | None = None, trace: bool = False) -> None:
    """Serve ``root`` and the ctl tree on ``listen`` until SIGINT/SIGTERM.

    Raises ValueError (bad dial string), OSError (cannot bind) and
    NotADirectoryError/FileNotFoundError (bad root) before serving starts.
    """
    from .server import Server  # imported late so --help works without it

    local = LocalFS(root)
    server_box: list = []
    ctl = CtlFS(exports=[str(local.root), "ctl"],
                providers={"connections": lambda: _connections_text(server_box[0])})
    fs = AnameMux(local, {"ctl": ctl})
    kw = {} if msize is None else {"msize": msize}
    server = Server(fs, trace=trace, **kw)
    server_box.append(server)
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                addrs = await nursery.start(server.serve, listen)
                for a in addrs:
                    log.info("serving %s (and aname ctl) on %s", local.root, a)
                    log.info("listening on %s", a)
                async for signum in signals:
                    log.info("got %s, shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        with trio.CancelScope(shield=True):
            await fs.close()


def _startup_error(e: BaseException) -> BaseException | None:
    """The ValueError/OSError inside ``e`` (perhaps wrapped in exception
    groups by trio's nurseries), or None if ``e`` is something else."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e if isinstance(e, (ValueError, OSError)) else None


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (2 for usage errors)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.debug_9p:
        logging.getLogger("ninep.trace").setLevel(logging.DEBUG)
    if args.command == "serve":
        if not args.root.is_dir():
            print(f"python -m ninep serve: --root {args.root}: not a directory", file=sys.stderr)
            return 2
        if args.msize is not None and args.msize < 4096:
            print("python -m ninep serve: --msize must be at least 4096", file=sys.stderr)
            return 2
        try:
            trio.run(partial(serve, args.listen, args.root, msize=args.msize, trace=args.debug_9p))
        except BaseException as e:
            leaf = _startup_error(e)
            if leaf is None:
                raise
            print(f"python -m ninep serve: {leaf}", file=sys.stderr)
            return 1
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
