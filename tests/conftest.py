"""Fixtures shared by the whole suite: a real ZooKeeper (tests/zookeeper.py)
and QEMU guests of the "tiny" image (tests/guestfixtures.py)."""

from tests.guestfixtures import guest_factory, tiny_image  # noqa: F401
from tests.zookeeper import private_zookeeper, zk_root, zookeeper  # noqa: F401

import pytest  # noqa: E402

from tests.openstack import ControlPlane, log_excerpt, log_offsets  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that used the OpenStack control plane reports what
    its services logged meanwhile (CI keeps nothing else of them)."""
    outcome = yield
    rep = outcome.get_result()
    plane = item.funcargs.get("openstack_cloud") if hasattr(item, "funcargs") else None
    if not isinstance(plane, ControlPlane):
        return
    if call.when == "setup":
        item.stash[_OS_LOG_START] = log_offsets(plane)
    if rep.failed and _OS_LOG_START in item.stash:
        rep.sections.append(("OpenStack control plane logs", log_excerpt(plane, item.stash[_OS_LOG_START])))


_OS_LOG_START = pytest.StashKey[dict]()
