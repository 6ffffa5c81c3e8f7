"""A throwaway ZooKeeper for tests: Debian's ``zookeeper`` package, run as a
child process on a free loopback port with its data in a temporary directory.

- :class:`mountd.zkserver.ZooKeeperServer` (the daemon's embedded server)
  starts/stops one; ``stop(kill=True)`` then ``start()`` again on the same
  port and data directory is a crash and restart (for session-loss tests).
- ``zookeeper`` (session scope) is one server shared by the whole test session;
- ``zk_root`` (function scope) is a fresh, unique znode path per test, so tests
  never see each other's records (the "chroot" each CloudFS gets as its root).

Every process started here is stopped in a ``finally``, even when a test fails.
Import the fixtures into a ``conftest.py``: ``from tests.zookeeper import zookeeper, zk_root``.
"""

from __future__ import annotations

import uuid

import pytest

from mountd.zkserver import ZooKeeperServer


@pytest.fixture(scope="session")
def zookeeper():
    """The session's ZooKeeperServer (started once, killed at session end)."""
    server = ZooKeeperServer(die_with_parent=True)  # gone even if pytest is killed
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def zk_root(zookeeper) -> str:
    """A fresh znode path no other test uses, e.g. ``/test-3f2a…``."""
    return f"/test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def private_zookeeper():
    """A ZooKeeperServer of this test alone, to stop and restart at will."""
    server = ZooKeeperServer(die_with_parent=True)  # gone even if pytest is killed
    try:
        server.start()
        yield server
    finally:
        server.cleanup()
