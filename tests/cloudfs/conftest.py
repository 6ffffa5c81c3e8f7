"""Fixtures of the cloudfs tests: CloudFS daemons on the real ZooKeeper of
tests/conftest.py."""

import pytest

from cloudfs.drivers.fake import FakeDriver
from cloudfs.namespace import open_cloudfs


@pytest.fixture
def driver():
    """One fake cloud, shared by the test's daemons."""
    return FakeDriver()


@pytest.fixture
async def cfs(zookeeper, zk_root, driver):
    """A CloudFS daemon on the test's fresh ZooKeeper root."""
    async with open_cloudfs(zookeeper.hosts, driver, zk_root, daemon_id="daemon-a") as fs:
        yield fs


@pytest.fixture
async def cfs2(zookeeper, zk_root, driver, cfs):
    """A second, independent CloudFS daemon (own kazoo session) on the same root."""
    async with open_cloudfs(zookeeper.hosts, driver, zk_root, daemon_id="daemon-b") as fs:
        yield fs
