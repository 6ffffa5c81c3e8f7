"""Fixtures shared by the whole suite: a real ZooKeeper (tests/zookeeper.py)
and QEMU guests of the "tiny" image (tests/guestfixtures.py)."""

from tests.guestfixtures import guest_factory, tiny_image  # noqa: F401
from tests.zookeeper import private_zookeeper, zk_root, zookeeper  # noqa: F401
