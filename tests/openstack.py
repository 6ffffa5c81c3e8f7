"""A real OpenStack (Zed, Debian 12 packages) on 127.0.0.1 for the tests:
``scripts/openstack/controlplane.py`` installs it (apt-get, once per
machine) and starts it once per test session; it is stopped at session end
even when tests fail.

- ``openstack_cloud`` (session scope): a :class:`ControlPlane` with
  ``clouds_yaml`` (path), ``cloud`` (the cloud's name in it, ``cloudfs``) and
  ``connect()`` (an openstacksdk Connection as admin).  The cloud has image
  ``tiny``, flavors ``m1.tiny`` and ``m1.small`` and network ``user``
  (10.0.0.0/24); its compute service is Nova's fake driver (no VM runs).
  ``outage("glance", "neutron")`` (a context manager) stops API services
  and brings them back, answering, on leaving, even when the body fails.

Import it where it is needed: ``from tests.openstack import openstack_cloud``.
Several modules may import it: they share one control plane (reference
counted).  Its ports are a free range picked per session (``--port-base``),
so concurrent sessions on one machine do not meet.

The tests are skipped, saying why, only when the control plane cannot be
installed for a reason outside the project (not root, not Debian, apt's
mirror unreachable); a start that fails is an error.  Set
``CLOUDFS_OS_STATE=DIR`` to use (and start if needed) a control plane in DIR
and leave it running after the session (for quick iterations).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "openstack", "controlplane.py")
PYTHON = "/usr/bin/python3"  # Debian's: it has the services' libraries


class ControlPlane:
    """One running control plane: ``state`` dir, ``clouds_yaml``, ``cloud``."""

    def __init__(self, state: str, keep: bool):
        self.state = state
        self.keep = keep
        self.clouds_yaml = os.path.join(state, "clouds.yaml")
        self.cloud = "cloudfs"
        #: size of every log file (path → bytes) when this session's start
        #: returned: what came before is an earlier session's (a kept plane)
        self.session_start: dict[str, int] = {}

    def log_files(self) -> list[str]:
        """Every log file of the control plane (services' and RabbitMQ's)."""
        import glob

        return sorted(glob.glob(os.path.join(self.logs(), "**", "*.log"), recursive=True))

    @property
    def auth_url(self) -> str:
        """Keystone's URL (``http://127.0.0.1:PORT/v3``)."""
        import json

        with open(os.path.join(self.state, "ports.json")) as f:
            return f"http://127.0.0.1:{json.load(f)['keystone']}/v3"

    def env(self) -> dict[str, str]:
        """Environment variables that select this cloud (python-openstackclient style)."""
        return {"OS_CLIENT_CONFIG_FILE": self.clouds_yaml, "OS_CLOUD": self.cloud}

    def connect(self):
        """An openstacksdk Connection to this cloud as admin."""
        import openstack.config

        config = openstack.config.OpenStackConfig(config_files=[self.clouds_yaml])
        region = config.get_one(cloud=self.cloud)
        import openstack.connection

        return openstack.connection.Connection(config=region)

    def logs(self) -> str:
        return os.path.join(self.state, "log")

    #: An authenticated request that succeeds only when the API answers.
    _PROBES = {
        "keystone": lambda c: c.authorize(),
        "placement": lambda c: c.placement.get("/resource_providers").raise_for_status(),
        "glance": lambda c: next(iter(c.image.images()), None),
        "neutron": lambda c: next(iter(c.network.networks()), None),
        "nova-api": lambda c: next(iter(c.compute.flavors()), None),
    }

    def stop_services(self, *names: str) -> None:
        """Stop the API services ``names`` (``glance``, ``neutron``,
        ``placement``, ``nova-api``, ``keystone``; also ``glance-api``,
        ``neutron-server``): their whole process groups, and return when a
        connection to their ports is refused.  The rest keeps running.
        Prefer :meth:`outage`, which also brings them back."""
        r = _run("stop", self.state, *names, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"stopping {', '.join(names)} failed:\n{r.stdout[-3000:]}")
        for port in self._ports(names):
            with socket.socket() as s:
                s.settimeout(5)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    raise RuntimeError(f"port {port} still answers after stopping {', '.join(names)}")

    def start_services(self, *names: str, timeout: float = 120.0) -> None:
        """Start the API services ``names`` that are not running and return
        when each answers an authenticated request (e.g. ``image.images()``
        for ``glance``, ``network.networks()`` for ``neutron``)."""
        r = _run("start", self.state, *names, timeout=timeout + 60)
        if r.returncode != 0:
            raise RuntimeError(f"starting {', '.join(names)} failed:\n{r.stdout[-3000:]}")
        deadline = time.monotonic() + timeout
        for name in _canonical(names):
            while True:
                conn = self.connect()
                try:
                    self._PROBES[name](conn)
                    break
                except Exception as e:  # noqa: BLE001 - not answering yet
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name} does not answer after its restart: "
                                           f"{type(e).__name__}: {e}") from e
                finally:
                    conn.close()
                time.sleep(0.5)

    @contextlib.contextmanager
    def outage(self, *names: str):
        """``with plane.outage("glance", "neutron"):`` — those API services
        are down inside (connections to their ports refused; Keystone, Nova
        and the rest keep running) and back, answering authenticated
        requests, after it, even when the body raises.  The stop is clean:
        nothing the health check (tests/scripts/test_openstack_controlplane.py)
        takes for a crash is logged."""
        services = _canonical(names)  # a wrong name fails before anything stops
        try:
            self.stop_services(*services)
            yield self
        finally:
            self.start_services(*services)

    def _ports(self, names) -> list[int]:
        import json

        with open(os.path.join(self.state, "ports.json")) as f:
            ports = json.load(f)
        return [ports[_PORT_KEY[n]] for n in _canonical(names)]


#: Which ports.json entry each API service listens on, and other names for them.
_PORT_KEY = {"keystone": "keystone", "placement": "placement", "glance": "glance",
             "neutron": "neutron", "nova-api": "nova"}
_ALIASES = {"glance-api": "glance", "neutron-server": "neutron", "neutron-api": "neutron",
            "nova": "nova-api", "placement-api": "placement"}


def _canonical(names) -> list[str]:
    out = []
    for n in names:
        n = _ALIASES.get(n, n)
        if n not in _PORT_KEY:
            raise ValueError(f"{n!r} is not an API service that can be stopped alone ({', '.join(_PORT_KEY)})")
        if n not in out:
            out.append(n)
    return out


_lock = threading.Lock()
_shared: dict[str, object] = {"plane": None, "users": 0, "skip": None}


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


def _free_port_base(span: int = 12) -> int:
    """A base N with 127.0.0.1:N … N+span-1 all free, so this session's
    control plane never meets another one on this machine (other sessions'
    tests, a developer's own)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 30000, 20)
        socks = []
        try:
            for p in range(base, base + span):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base
    raise RuntimeError("no free range of loopback ports for the control plane")


def _outside_reason() -> str | None:
    """Why this machine cannot have the control plane, if the reason is not
    the project's (then the tests skip)."""
    if os.geteuid() != 0:
        return "the OpenStack control plane needs root (apt-get, services)"
    if not os.path.exists("/etc/debian_version") or not os.path.exists(PYTHON):
        return "the OpenStack control plane needs Debian 12 with /usr/bin/python3"
    return None


def _acquire() -> ControlPlane:
    with _lock:
        if _shared["skip"]:
            pytest.skip(str(_shared["skip"]))
        if _shared["plane"] is not None:
            _shared["users"] = int(_shared["users"]) + 1
            return _shared["plane"]  # type: ignore[return-value]
        reason = _outside_reason()
        if reason:
            _shared["skip"] = reason
            print(f"\n*** SKIPPING OpenStack tests: {reason} ***", file=sys.stderr)
            pytest.skip(reason)
        r = _run("install", timeout=900)
        if r.returncode != 0:
            reason = f"installing the OpenStack packages failed (apt mirror?):\n{r.stdout[-3000:]}"
            _shared["skip"] = reason
            print(f"\n*** SKIPPING OpenStack tests: {reason} ***", file=sys.stderr)
            pytest.skip(reason)
        keep_dir = os.environ.get("CLOUDFS_OS_STATE")
        state = keep_dir or tempfile.mkdtemp(prefix="cloudfs-openstack-")
        plane = ControlPlane(state, keep=bool(keep_dir))
        ports = [] if keep_dir else ["--port-base", str(_free_port_base())]
        ok = False
        try:
            r = _run("start", state, *ports, timeout=600)
            ok = r.returncode == 0
        finally:
            if not ok:  # stop what did start, even on a timeout or ^C
                _release_plane(plane)
        if not ok:
            pytest.fail(f"the OpenStack control plane did not start:\n{r.stdout[-5000:]}", pytrace=False)
        plane.session_start = {p: os.path.getsize(p) for p in plane.log_files()}
        _shared["plane"] = plane
        _shared["users"] = 1
        return plane


def _release_plane(plane: ControlPlane) -> None:
    if plane.keep:
        return
    try:
        _run("stop", plane.state, timeout=300)
    finally:
        shutil.rmtree(plane.state, ignore_errors=True)


def _release() -> None:
    with _lock:
        _shared["users"] = int(_shared["users"]) - 1
        if int(_shared["users"]) > 0:
            return
        plane = _shared["plane"]
        _shared["plane"] = None
    if plane is not None:
        _release_plane(plane)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def openstack_cloud():
    """The session's OpenStack control plane (started once, stopped at the end)."""
    plane = _acquire()
    try:
        yield plane
    finally:
        _release()


#: The control plane's logs shown with a failing test (most telling first).
_TOLD_LOGS = ("nova-conductor", "nova-scheduler", "nova-compute", "nova-api", "placement",
              "neutron", "keystone", "rabbitmq")


def log_offsets(plane: ControlPlane) -> dict[str, int]:
    """The current size (bytes) of each of the control plane's logs."""
    sizes = {}
    for name in _TOLD_LOGS:
        try:
            sizes[name] = os.path.getsize(os.path.join(plane.logs(), f"{name}.log"))
        except OSError:
            pass
    return sizes


def log_excerpt(plane: ControlPlane, since: dict[str, int], lines: int = 25) -> str:
    """What each service logged after ``since`` (from :func:`log_offsets`):
    its WARNING/ERROR lines and last ``lines`` lines, each cut to 300
    characters, so a failure in CI says what the cloud was doing."""
    out = []
    for name, start in since.items():
        try:
            with open(os.path.join(plane.logs(), f"{name}.log"), "rb") as f:
                f.seek(start)
                new = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            continue
        if not new:
            continue
        bad = [x for x in new if " WARNING " in x or " ERROR " in x or "Traceback" in x]
        tail = new[-lines:]
        shown = [x for x in bad if x not in tail][-lines:] + tail
        out.append(f"--- {name}.log ({len(new)} new lines)")
        out.extend(x[:300] for x in shown)
    return "\n".join(out)
