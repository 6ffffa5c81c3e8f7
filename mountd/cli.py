"""The ``cloudfs`` command: ``cloudfs up|ps|top|ctl|kill|import|image``.

- ``cloudfs up``: the daemon (:mod:`mountd.daemon`): ZooKeeper, the namespace,
  9P listeners, a FUSE mount, the reconciler; foreground.
- ``cloudfs ps [--tree]``: the process table (:mod:`mountd.ps`).
- ``cloudfs top``: processes and what their VMs use, live (:mod:`mountd.top`).
- ``cloudfs ctl PID COMMAND…``, ``cloudfs kill PID…``: ctl writes that print
  the daemon's message on failure (:mod:`mountd.ctlcmd`).
- ``cloudfs import DIALSTRING DIR``: mount a remote 9P namespace with FUSE
  (:mod:`mountd.importer`).
- ``cloudfs image build NAME``: build a guest image into the state dir's
  image store (:mod:`cloudfs.imagestore`).

``cloudfs COMMAND --help`` describes each.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cloudfs.quotas import DEFAULT_LIMITS, DEFAULT_MAX_PROCESSES, LIMIT_MAX, limit_max

from .daemon import DEFAULT_LISTEN, DEFAULT_STATE_DIR

__all__ = ["build_parser", "main", "cmd_import", "cmd_up", "cmd_ps", "cmd_ctl", "cmd_kill", "cmd_top",
           "cmd_image_build"]


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


def cmd_up(args: argparse.Namespace) -> int:
    """``cloudfs up``: run the daemon in the foreground; returns the exit status."""
    import trio

    from .daemon import DaemonOptions, run

    opts = DaemonOptions(
        mount=Path(args.mount) if args.mount else None,
        listen=args.listen or [DEFAULT_LISTEN],
        zookeeper=args.zookeeper,
        driver=args.driver,
        state_dir=Path(args.state_dir),
        deployment=args.deployment,
        os_cloud=args.os_cloud,
        debug_9p=args.debug_9p,
        debug_fuse=args.debug_fuse,
        limits=dict(args.limit or []),
        zookeeper_auth=Path(args.zookeeper_auth) if args.zookeeper_auth else None,
        adopt_open_tree=args.adopt_open_tree,
        max_processes=args.max_processes,
        qemu_user=None if args.qemu_user == "root" else args.qemu_user,
        boot=args.boot,
        migrate_listen=args.migrate_listen or "",
        files=args.files,
        files_container=args.files_container,
        files_limits=dict(args.files_limit or []),
        fake_cloud=Path(args.fake_cloud) if args.fake_cloud else None,
        session_timeout=args.session_timeout,
        host=args.host,
    )
    from ninep.errors import FsError

    if args.fake_cloud and args.driver != "fake":
        logging.getLogger("cloudfs").error("cloudfs up: --fake-cloud is for --driver fake")
        return 2
    if args.migrate_listen:
        from ninep.dial import parse_dial

        try:
            where = parse_dial(args.migrate_listen)
        except ValueError as e:
            where, why = None, str(e)
        else:
            why = "want tcp!ADDR!PORT"
        if args.driver != "qemu" or where is None or where.net != "tcp":
            logging.getLogger("cloudfs").error("cloudfs up: --migrate-listen %s: %s", args.migrate_listen,
                                               why if args.driver == "qemu" else "it is for --driver qemu")
            return 2
    if args.debug_9p:
        logging.getLogger("ninep.trace").setLevel(logging.DEBUG)
    try:
        trio.run(run, opts)
    except (ValueError, RuntimeError, OSError, FsError) as e:
        logging.getLogger("cloudfs").error("cloudfs up: %s", e)
        return 1
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    """``cloudfs ps``: print the process table or tree; returns the exit status."""
    import trio

    from ninep.errors import FsError

    from .ps import ps

    server = _operator(args)
    try:
        out = trio.run(lambda: ps(mount=Path(args.mount) if args.mount else None, server=server, tree=args.tree))
    except (FsError, OSError, ValueError) as e:
        print(f"cloudfs ps: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(out)
    return 0


def _operator(args: argparse.Namespace) -> str:
    return args.server or f"unix!{Path(args.state_dir) / 'cloudfs.sock'}"


def cmd_ctl(args: argparse.Namespace) -> int:
    """``cloudfs ctl PID COMMAND…``: one ctl write; prints its result, or the
    daemon's message and exits 1."""
    import trio

    from ninep.errors import FsError

    from .ctlcmd import ctl

    try:
        out = trio.run(ctl, _operator(args), args.pid, " ".join(args.command))
    except (FsError, OSError, ValueError) as e:
        print(f"cloudfs ctl: {args.pid}: {getattr(e, 'message', None) or e}", file=sys.stderr)
        return 1
    sys.stdout.write(out)
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    """``cloudfs kill PID…``: ``kill`` to each; exits 1 if any failed."""
    import trio

    from .ctlcmd import kill

    try:
        results = trio.run(kill, _operator(args), args.pids)
    except ValueError as e:
        print(f"cloudfs kill: {e}", file=sys.stderr)
        return 1
    status = 0
    for pid, e in results:
        if e is not None:
            print(f"cloudfs kill: {pid}: {getattr(e, 'message', None) or e}", file=sys.stderr)
            status = 1
    return status


def cmd_top(args: argparse.Namespace) -> int:
    """``cloudfs top``: the live table; exit status."""
    import trio

    from ninep.errors import FsError

    from .top import top

    server = None if args.mount else _operator(args)
    try:
        trio.run(lambda: top(mount=Path(args.mount) if args.mount else None, server=server, batch=args.batch,
                             iterations=args.iterations, delay=args.delay, sort=args.sort))
    except KeyboardInterrupt:
        return 0
    except (FsError, OSError, ValueError) as e:
        print(f"cloudfs top: {e}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as eg:  # from the sampling tasks
        first = eg.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        if not isinstance(first, (FsError, OSError)):
            raise
        print(f"cloudfs top: {first}", file=sys.stderr)
        return 1
    return 0


def cmd_image_build(args: argparse.Namespace) -> int:
    """``cloudfs image build NAME``: build an image into the store; exit status."""
    from cloudfs.imagestore import build_image_main

    return build_image_main(args.name, Path(args.state_dir))


def _count(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) > LIMIT_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 0 to {LIMIT_MAX}")
    return int(text)


def _host(text: str) -> str:
    from cloudfs.hosts import check_host_name

    try:
        return check_host_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 1.0 <= value <= 60.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 1 to 60")
    return value


def _limit(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or name not in DEFAULT_LIMITS:
        raise argparse.ArgumentTypeError(f"{text!r}: use NAME=VALUE with NAME one of {', '.join(DEFAULT_LIMITS)}")
    top = limit_max(name)
    if not value.isascii() or not value.isdigit() or len(value) > len(str(top)) or int(value) > top:
        raise argparse.ArgumentTypeError(f"{text!r}: {name} must be a whole number from 0 to {top}")
    return name, int(value)


def _files_limit(text: str) -> tuple[str, int]:
    from cloudfs.quotas import FILE_BYTES, FILES

    name, sep, value = text.partition("=")
    if not sep or name not in (FILES, FILE_BYTES):
        raise argparse.ArgumentTypeError(f"{text!r}: use files=N or file-bytes=N")
    return _limit(text)


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

    up = sub.add_parser(
        "up", help="run the cloudfs daemon (foreground)",
        description="Run the cloudfs daemon in the foreground: connect to ZooKeeper (or start an "
                    "embedded one), serve the namespace over 9P and, with --mount, over FUSE, and run "
                    "the reconciler of the compute driver. SIGINT/SIGTERM: unmount, close connections, "
                    "stop the embedded ZooKeeper; VMs keep running and are re-adopted on the next start.",
        epilog="9P: the --listen addresses serve the public face (a process's view for a guest's "
               "pid/secret credential, else read-only); each QEMU VM attaches over its own channel (a "
               "listener in the VM's network namespace) as its process; STATE/cloudfs.sock serves the "
               "operator's view with full rights. Several daemons share one deployment with --zookeeper "
               "HOSTS. Not as root: give --state-dir and a --listen port of 1024 or more.",
    )
    up.add_argument("--mount", metavar="DIR", help="mount the namespace here with FUSE")
    up.add_argument("--listen", metavar="DIALSTRING", action="append",
                    help=f"9P listen address, repeatable (default {DEFAULT_LISTEN})")
    up.add_argument("--zookeeper", metavar="HOSTS",
                    help="ZooKeeper connect string: one server or an ensemble, with an optional chroot, e.g. "
                         "zk1:2181,zk2:2181,zk3:2181/cloudfs (default: start an embedded one, data in the state "
                         "dir)")
    up.add_argument("--zookeeper-auth", metavar="FILE",
                    help="ZooKeeper digest credential 'user:password' (mode 0600); every znode of the deployment "
                         "carries an ACL only it passes (default: STATE/zookeeper.auth, made on first start; give "
                         "the other daemons of a deployment a copy)")
    up.add_argument("--adopt-open-tree", action="store_true",
                    help="take over a deployment tree that exists without the credential's ACL (made before "
                         "ACLs, or by any ZooKeeper client): check it first, then start once with this")
    up.add_argument("--driver", default="qemu", choices=["qemu", "fake", "openstack"],
                    help="compute driver: qemu (local QEMU VMs, default), openstack, or fake (records only)")
    up.add_argument("--fake-cloud", metavar="DIR",
                    help="fake driver: keep servers as files in DIR, one fake cloud shared by every daemon given "
                         "the same DIR (default: in the daemon's memory)")
    up.add_argument("--host", metavar="NAME", type=_host,
                    help="this daemon's name in /hosts (default: the machine's hostname); one live daemon per name "
                         "in a deployment")
    up.add_argument("--session-timeout", metavar="SECONDS", type=_seconds, default=10.0,
                    help="ZooKeeper session timeout (default 10): after this long cut off from the ensemble the "
                         "daemon's session ends and other daemons take over its work")
    up.add_argument("--qemu-user", metavar="USER", default="nobody",
                    help="qemu driver, daemon run as root: the user QEMU drops to once it has opened its files "
                         "(-runas; default nobody; 'root' keeps root)")
    up.add_argument("--boot", choices=["snapshot", "cold"], default="snapshot",
                    help="qemu driver: how new VMs start: snapshot (default: restored from a boot template of "
                         "their image, made once in the background; cold until it is ready) or cold (always "
                         "booted)")
    up.add_argument("--migrate-listen", metavar="DIALSTRING",
                    help="qemu driver: take VMs moved here by 'migrate HOST' at this tcp!ADDR!PORT, an address the "
                         "other hosts' daemons reach (shown in /hosts; default: take none)")
    up.add_argument("--os-cloud", metavar="NAME",
                    help="openstack driver: the clouds.yaml entry (default: OS_CLOUD or the OS_* variables)")
    up.add_argument("--state-dir", metavar="DIR", default=str(DEFAULT_STATE_DIR),
                    help=f"daemon state: VMs, images, embedded ZooKeeper, operator socket (default {DEFAULT_STATE_DIR})")
    up.add_argument("--deployment", metavar="NAME", default="default",
                    help="deployment name: its tree is /cloudfs/NAME in ZooKeeper (default 'default'); "
                         "the tree's unique id, made with it and logged at start, marks its servers")
    up.add_argument("--limit", metavar="NAME=VALUE", action="append", type=_limit,
                    help="quota limit new processes get, repeatable: "
                         f"{', '.join(f'{n}={v}' for n, v in DEFAULT_LIMITS.items())} by default "
                         "(see /proc/<pid>/limits)")
    up.add_argument("--max-processes", metavar="N", type=_count, default=DEFAULT_MAX_PROCESSES,
                    help=f"processes a new deployment may hold in all: init's descendants limit "
                         f"(default {DEFAULT_MAX_PROCESSES})")
    up.add_argument("--files", choices=["local", "swift"], default="local",
                    help="where /files keeps its files: local (STATE/files, one host; default) or swift (the "
                         "object store of --os-cloud, shared by the daemons of a deployment)")
    up.add_argument("--files-container", metavar="NAME",
                    help="--files swift: the container (default cloudfs-DEPLOYMENT)")
    up.add_argument("--files-limit", metavar="NAME=VALUE", action="append", type=_files_limit,
                    help="the deployment's /files limits, repeatable: files=65536, file-bytes=68719476736 by "
                         "default (each process also has its own: --limit files=… file-bytes=…)")
    up.add_argument("--debug-9p", action="store_true", help="log every 9P message")
    up.add_argument("--debug-fuse", action="store_true", help="log every FUSE request")
    up.add_argument("--debug", action="store_true", help="debug logging")
    up.set_defaults(func=cmd_up)

    ps = sub.add_parser("ps", help="list cloud processes",
                        description="List the processes of a deployment (PID PPID NAME STATE IMAGE HOST), "
                                    "read from the namespace.")
    ps.add_argument("--tree", action="store_true", help="draw the process tree")
    src = ps.add_mutually_exclusive_group()
    src.add_argument("--mount", metavar="DIR", help="read a mounted namespace")
    src.add_argument("--server", metavar="DIALSTRING", help="read over 9P (default: the operator socket)")
    ps.add_argument("--state-dir", metavar="DIR", default=str(DEFAULT_STATE_DIR),
                    help=f"where the operator socket is (default {DEFAULT_STATE_DIR})")
    ps.set_defaults(func=cmd_ps)

    def operator_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--server", metavar="DIALSTRING", help="the daemon's 9P address (default: the operator socket)")
        sp.add_argument("--state-dir", metavar="DIR", default=str(DEFAULT_STATE_DIR),
                        help=f"where the operator socket is (default {DEFAULT_STATE_DIR})")

    ctl = sub.add_parser("ctl", help="write a command to /proc/PID/ctl, with the daemon's message on failure",
                         description="Write one ctl command (fork, exec IMAGE …, kill, stop, start) to "
                                     "/proc/PID/ctl over 9P2000.u and print its result (fork: the new pid). "
                                     "On failure print the daemon's message (FUSE can only say the errno) "
                                     "and exit 1.")
    ctl.add_argument("pid", metavar="PID")
    ctl.add_argument("command", metavar="COMMAND", nargs="+", help="e.g. exec tiny flavor=m1.small")
    operator_args(ctl)
    ctl.set_defaults(func=cmd_ctl)

    kl = sub.add_parser("kill", help="kill processes (and their descendants)",
                        description="Write kill to each PID's ctl; print the daemon's message for each "
                                    "that fails and exit 1.")
    kl.add_argument("pids", metavar="PID", nargs="+")
    operator_args(kl)
    kl.set_defaults(func=cmd_kill)

    tp = sub.add_parser("top", help="a live table of processes and what their VMs use",
                        description="Like top(1)/virt-top: pid, ppid, name, state, host, CPU %, memory, block "
                                    "and network rates of every process, refreshed every DELAY seconds, read "
                                    "from /proc/<pid>/status and /proc/<pid>/stats (a mount or 9P).")
    tp.add_argument("-b", "--batch", action="store_true", help="print frames one after another (for scripts)")
    tp.add_argument("-n", "--iterations", type=int, metavar="N", help="stop after N frames")
    tp.add_argument("-d", "--delay", type=float, default=1.0, metavar="S", help="seconds between frames (1)")
    tp.add_argument("-s", "--sort", default="cpu", choices=["cpu", "mem", "pid", "blk", "net"],
                    help="sort by this column, biggest first (default cpu)")
    tp.add_argument("--mount", metavar="DIR", help="read a mounted namespace instead of 9P")
    operator_args(tp)
    tp.set_defaults(func=cmd_top)

    image = sub.add_parser("image", help="manage guest images")
    isub = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    build = isub.add_parser("build", help="build a guest image (e.g. tiny) from Debian packages, cached",
                            description="Build a guest image into STATE/images from Debian packages "
                                        "(kernel from linux-image-amd64 via apt-get download + dpkg -x, "
                                        "busybox-static); rebuilds only when its inputs change.")
    build.add_argument("name", metavar="NAME", help="image to build (tiny)")
    build.add_argument("--state-dir", metavar="DIR", default=str(DEFAULT_STATE_DIR),
                       help=f"daemon state dir (default {DEFAULT_STATE_DIR})")
    build.set_defaults(func=cmd_image_build)
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
