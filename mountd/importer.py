"""``cloudfs import``: mount a remote 9P namespace through FUSE.

For hosts and guests without the kernel's v9fs, or without root: the 9P
client is :mod:`ninep.client` (9P2000.L, .u or 9P2000 over ``tcp!host!port``
or ``unix!path``), the tree is :class:`ninep.remotefs.RemoteFS`, the mount is
:func:`mountd.fuse.mount`.  Runs in the foreground; SIGINT/SIGTERM unmount
and end it with status 0; a lost 9P connection unmounts and ends it with
status 1.
"""

from __future__ import annotations

import logging
import signal

import trio

from ninep.client import open_client
from ninep.remotefs import RemoteFS

from .fuse import default_uname, mount

__all__ = ["run_import", "CONNECTION_CHECK"]

log = logging.getLogger(__name__)

#: Seconds between checks that the 9P connection is still up.
CONNECTION_CHECK = 0.5


async def run_import(
    dialstring: str,
    mountpoint: str,
    *,
    aname: str = "",
    uname: str | None = None,
    version: str = "9P2000.L",
    debug: bool = False,
    task_status=trio.TASK_STATUS_IGNORED,
) -> int:
    """Mount ``dialstring``'s tree ``aname`` at ``mountpoint`` until SIGINT,
    SIGTERM, an unmount from outside, or loss of the connection.

    ``uname`` defaults to the local user's name; ``version`` is the dialect
    asked for (the server may answer an older one).  Returns the exit status:
    0 after a signal or an outside unmount, 1 when the 9P connection was lost.
    Raises FsError/OSError when dialling, the handshake or the attach fail,
    RuntimeError when mounting fails.  ``task_status.started()`` once mounted.
    Must run in the main thread (signal handling).
    """
    uname = uname if uname is not None else default_uname()
    status = 0
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_client(dialstring, version=version, uname=uname, aname=aname) as client:
            log.info("connected to %s (%s, msize %d)", dialstring, client.dialect.value, client.msize)
            async with trio.open_nursery() as nursery:

                async def on_signal() -> None:
                    async for sig in signals:
                        log.info("%s: unmounting %s", signal.Signals(sig).name, mountpoint)
                        nursery.cancel_scope.cancel()
                        return

                async def watch_connection() -> None:
                    nonlocal status
                    while not client.closed:
                        await trio.sleep(CONNECTION_CHECK)
                    log.error("9P connection to %s lost: unmounting %s", dialstring, mountpoint)
                    status = 1
                    nursery.cancel_scope.cancel()

                async def serve(task_status=trio.TASK_STATUS_IGNORED) -> None:
                    await mount(
                        RemoteFS(client), mountpoint, fsname=f"9p:{dialstring}", debug=debug,
                        uname=uname, aname=aname, task_status=task_status,
                    )
                    nursery.cancel_scope.cancel()  # unmounted from outside

                nursery.start_soon(on_signal)
                nursery.start_soon(watch_connection)
                await nursery.start(serve)
                task_status.started()
    return status
