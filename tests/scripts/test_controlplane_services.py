"""ControlPlane.outage (tests/openstack.py): an outage of the Image API
(Glance) and the Networking API (Neutron) while Keystone, Nova and the rest
keep running, and their return.

During the outage nothing listens on their ports, so openstacksdk's calls
fail at once, not after a timeout and not with an HTTP error: keystoneauth's
ConnectFailure (connection refused), except that a Connection that never
used the Image API yet gets openstack.exceptions.NotSupported (its version
discovery on Glance's unversioned endpoint failed).  Nova's API still
answers.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import time

import openstack.exceptions
import pytest
from keystoneauth1 import exceptions as ksa_exc

from tests.openstack import openstack_cloud  # noqa: F401
from tests.scripts.test_openstack_controlplane import BROKEN  # what the health check takes for a crash

pytestmark = [
    pytest.mark.openstack,
    # openstacksdk's own deprecation notices about its internals
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:openstack"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:openstack"),
]

#: How long a call to a stopped API may take to fail (connection refused is
#: immediate; a hang would be a connect timeout).
QUICK = 5.0


def ports(plane) -> dict[str, int]:
    import json

    with open(f"{plane.state}/ports.json") as f:
        return json.load(f)


def refused(port: int) -> bool:
    """Whether a connection to 127.0.0.1:``port`` is refused (not accepted,
    not left hanging)."""
    with socket.socket() as s:
        s.settimeout(3)
        return s.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED


def listening(port: int) -> str:
    """``ss -ltnp``'s lines for a listener on 127.0.0.1:``port`` ("" if none)."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    return out.strip()


def fails_quickly(call) -> Exception:
    """The exception ``call()`` raises, checked to come within QUICK seconds."""
    t0 = time.monotonic()
    with pytest.raises(Exception) as info:
        call()
    took = time.monotonic() - t0
    assert took < QUICK, f"{info.value!r} only after {took:.1f}s"
    return info.value


def refused_error(e: Exception) -> bool:
    return isinstance(e, ksa_exc.ConnectFailure) and "refused" in str(e).lower()


def described(e: Exception) -> str:
    return f"{type(e).__module__}.{type(e).__name__}: {e}"


def test_glance_and_neutron_outage(openstack_cloud):  # noqa: F811
    plane = openstack_cloud
    p = ports(plane)
    early = plane.connect()  # its version discovery done before the outage
    fresh = None
    try:
        assert next(iter(early.image.images()), None) is not None
        assert next(iter(early.network.networks()), None) is not None
        t0 = time.monotonic()
        with plane.outage("glance-api", "neutron-server"):
            stopped = time.monotonic() - t0
            for port in (p["glance"], p["neutron"]):
                assert refused(port)
                if shutil.which("ss"):
                    assert listening(port) == ""
            for port in (p["keystone"], p["nova"], p["placement"]):
                assert not refused(port)
            # a connection that used the APIs before: the request's connection refused
            for call in (lambda: list(early.image.images()), lambda: list(early.network.networks())):
                e = fails_quickly(call)
                assert refused_error(e), described(e)
            assert "m1.tiny" in [f.name for f in early.compute.flavors()]
            # a new one: the same for Neutron; for Glance (its catalog URL is
            # unversioned) openstacksdk's version discovery fails first
            fresh = plane.connect()
            e = fails_quickly(lambda: list(fresh.network.networks()))
            assert refused_error(e), described(e)
            e = fails_quickly(lambda: list(fresh.image.images()))
            assert refused_error(e) or isinstance(e, openstack.exceptions.NotSupported), described(e)
            assert "m1.tiny" in [f.name for f in fresh.compute.flavors()]
            t1 = time.monotonic()
        restored = time.monotonic() - t1
        print(f"\noutage: stopped in {stopped:.1f}s, back in {restored:.1f}s")
        for port in (p["glance"], p["neutron"]):
            assert listening(port) if shutil.which("ss") else not refused(port)
        # back, for the connections from before and from during the outage too
        for conn in (early, fresh):
            assert "tiny" in [i.name for i in conn.image.images()]
            assert "user" in [n.name for n in conn.network.networks()]
    finally:
        for conn in (early, fresh):
            if conn is not None:
                conn.close()


def test_outage_restores_when_the_body_fails(openstack_cloud):  # noqa: F811
    plane = openstack_cloud
    with pytest.raises(ZeroDivisionError):
        with plane.outage("glance"):
            assert refused(ports(plane)["glance"])
            1 / 0
    conn = plane.connect()
    try:
        assert "tiny" in [i.name for i in conn.image.images()]
        assert "user" in [n.name for n in conn.network.networks()]  # never stopped
    finally:
        conn.close()


def test_unknown_service_stops_nothing(openstack_cloud):  # noqa: F811
    plane = openstack_cloud
    with pytest.raises(ValueError):
        with plane.outage("glance", "mariadb"):
            pass
    assert not refused(ports(plane)["glance"])


def test_a_deliberate_outage_is_not_a_crash(openstack_cloud):  # noqa: F811
    """What the services log while stopped and started again holds nothing
    the health check (tests/scripts/test_openstack_controlplane.py) takes
    for a crash (neutron-server's workers once died "killed by signal 15"
    when the whole group got SIGTERM)."""
    plane = openstack_cloud
    for _ in range(2):
        since = {path: os.path.getsize(path) for path in plane.log_files()}
        with plane.outage("glance", "neutron"):
            pass
        found = []
        for path in plane.log_files():
            with open(path, errors="replace") as f:
                f.seek(since.get(path, 0))
                found += [f"{os.path.basename(path)}: {line.strip()[:200]}" for line in f
                          if any(m in line for m in BROKEN)]
        assert not found, "\n".join(found[:20])


def test_swift_serves_objects_to_the_clouds_users_only(openstack_cloud):  # noqa: F811
    """The control plane's Swift (issue "files"): the object-store endpoint
    is in the catalog, the admin stores and reads an object, a ranged GET
    gives the range, and a request without a token is refused (401)."""
    import urllib.error
    import urllib.request
    import uuid

    conn = openstack_cloud.connect()
    container = f"cp-test-{uuid.uuid4().hex[:8]}"
    conn.object_store.create_container(container)
    try:
        conn.object_store.upload_object(container, "a/b.txt", data=b"0123456789")
        assert conn.object_store.download_object("a/b.txt", container=container) == b"0123456789"
        r = conn.object_store.get(f"{container}/a/b.txt", headers={"Range": "bytes=2-4"})
        assert r.status_code == 206 and r.content == b"234"
        url = conn.object_store.get_endpoint()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}/{container}/a/b.txt", timeout=10)
        assert e.value.code == 401
    finally:
        conn.object_store.delete_object("a/b.txt", container=container, ignore_missing=True)
        conn.object_store.delete_container(container, ignore_missing=True)
