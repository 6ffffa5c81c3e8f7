#!/usr/bin/python3
"""A minimal OpenStack (Zed, Debian 12 packages) on 127.0.0.1, for cloudfs's
integration tests and for trying ``cloudfs up --driver openstack`` locally.

Usage (as root, with Debian's own ``/usr/bin/python3``)::

    controlplane.py install            # apt-get the packages (idempotent)
    controlplane.py start STATE_DIR [--port-base N]
                                       # start, wait until ready, write clouds.yaml
    controlplane.py up STATE_DIR       # install + start
    controlplane.py stop STATE_DIR     # stop everything started from STATE_DIR
    controlplane.py stop STATE_DIR glance neutron
                                       # stop only these API services (an outage)
    controlplane.py start STATE_DIR glance neutron
                                       # start them again, wait until they answer
    controlplane.py status STATE_DIR   # which services run (exit 1 if one is down)

Services (standard ports, or N … N+11 with --port-base; kept in STATE_DIR/ports.json):
MariaDB (unix socket only), RabbitMQ (127.0.0.1:5672, its own
epmd on 127.0.0.1), keystone, placement and nova-api under uwsgi, glance-api,
neutron-server (ML2, openvswitch mechanism driver, vxlan tenant networks, an
agent row for each compute host inserted by us), nova-conductor,
nova-scheduler and two nova-computes run from python3-nova's
``nova.cmd.compute`` with ``compute_driver = fake.FakeDriver`` (Nova's
in-tree fake hypervisor: the API, scheduler, placement, Neutron port binding,
live migration and the server state machine are real; no VM runs), hosts
``cloudfs-compute`` (HOST: every boot goes there while it has room) and
``cloudfs-compute2`` (HOST2: a live-migration target; its own state dir
``STATE_DIR/nova2`` and ``etc/nova/nova-compute2.conf`` read after
``nova.conf``; it keeps most of its fake RAM back, see HOST2_RESERVED_MB),
and Swift: a proxy (keystone auth, object-store
endpoint ``/v1/AUTH_<project>``) with one account, container and object
server, a one-replica ring each, storage in ``STATE_DIR/swift/node/d1``
(the hash prefix and suffix of Debian's ``/etc/swift/swift.conf``).

Everything lives under STATE_DIR (configs in ``etc/``, logs in ``log/``, pid
files in ``run/``, databases, keys); ``start`` on a STATE_DIR that already has
data restarts on it without re-initialising, and ``start`` on a running one
only checks readiness.  Ready means: for each compute host a
compute-service heartbeat newer than this start, its resource provider in
placement and the host mapped to cell1; and the APIs answering.  The cloud
``cloudfs`` is written to ``STATE_DIR/clouds.yaml`` (admin in project admin), with image ``tiny``,
flavors ``m1.tiny`` (default) and ``m1.small``, and network ``user``
(10.0.0.0/24).

Facts this follows (measured on 2 cores): MariaDB not sqlite (concurrent
deletes, neutron migrations); uwsgi needs ``--need-app`` and ``Connection:
close``; conductor consuming before nova-compute starts; a fresh heartbeat
before the first boot; stopping neutron means its workers (each service runs
in its own process group and is stopped as a group; neutron's parent gets
the SIGTERM alone and stops its workers, a second SIGTERM kills them with
the signal, and so does one to a worker still starting its service, so
the stop waits until each has lived WORKER_SETTLE_S) and RabbitMQ means
``epmd -kill`` too; AMQP heartbeats off (uwsgi's idle nova-api cannot send
them, RabbitMQ drops its connection and the next cast is lost); neutron's
``agent_down_time`` at most 2**31-1 ms (a larger one crashes its workers
every few minutes).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

PACKAGES = [
    "keystone", "glance-api", "placement-api", "nova-api", "nova-conductor",
    "nova-scheduler", "python3-nova", "neutron-api", "neutron-rpc-server",
    "rabbitmq-server", "mariadb-server", "python3-pymysql",
    "swift-proxy", "swift-account", "swift-container", "swift-object", "python3-keystonemiddleware",
]

HOST = "cloudfs-compute"      # the first nova-compute service's host name: boots land here
HOST2 = "cloudfs-compute2"    # the second one's: a target for live migration
#: The nova-compute services: service name → the ``host`` it runs as.
COMPUTES = {"nova-compute": HOST, "nova-compute2": HOST2}
#: MiB of the fake hypervisor's 800000 that the second host keeps back
#: (``reserved_host_memory_mb``).  Free RAM being the scheduler's only
#: weigher, every boot goes to the first host while it has more than 200000
#: MiB free (deterministic placement for the tests), and with Nova's RAM
#: allocation ratio of 1.5 the second takes 300000 MiB of flavors, the
#: first 1200000: a server of a larger flavor cannot move there (the
#: scheduler refuses a live migration: "No valid host was found").
HOST2_RESERVED_MB = 600000
PASSWORD = "cloudfs-secret"    # admin and database password (loopback only)
REGION = "RegionOne"
# The standard ports; ``--port-base N`` puts them at N … N+7 instead (several
# control planes on one machine).  The choice is kept in STATE/ports.json.
STANDARD_PORTS = {"keystone": 5000, "glance": 9292, "placement": 8778, "nova": 8774,
                  "neutron": 9696, "rabbit": 5672, "rabbit_dist": 25672, "epmd": 4369,
                  "swift": 8080, "swift_object": 6200, "swift_container": 6201, "swift_account": 6202}
PORTS = dict(STANDARD_PORTS)  # this run's, set by load_ports()
DATABASES = ["keystone", "glance", "placement", "nova_api", "nova", "nova_cell0", "neutron"]
# Services in start order; each runs in its own process group.
SERVICES = ["mariadb", "rabbitmq", "keystone", "placement", "glance", "neutron",
            "nova-api", "nova-conductor", "nova-scheduler", *COMPUTES,
            "swift-account", "swift-container", "swift-object", "swift-proxy"]
#: Swift's servers: service name → (ports key, ring name or None for the proxy)
SWIFT = {"swift-account": ("swift_account", "account"), "swift-container": ("swift_container", "container"),
         "swift-object": ("swift_object", "object"), "swift-proxy": ("swift", None)}
READY_TIMEOUT = 240.0


def log(msg: str) -> None:
    print(f"[controlplane {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Failed(Exception):
    """A step failed; the message says which and where its log is."""


# ---------------------------------------------------------------- install

def installed(pkg: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    return "install ok installed" in r.stdout


def install() -> None:
    """apt-get the Debian 12 (Zed) packages not yet installed (no recommends;
    the image's policy-rc.d keeps their postinst scripts from starting services)."""
    missing = [p for p in PACKAGES if not installed(p)]
    if not missing:
        return
    log(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    t0 = time.monotonic()
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-5000:])
        raise Failed(f"apt-get install failed ({r.returncode})")
    log(f"installed in {time.monotonic() - t0:.0f}s")


# ---------------------------------------------------------------- layout

class Layout:
    """Paths under the state directory."""

    def __init__(self, state: str):
        self.root = os.path.abspath(state)
        self.etc = f"{self.root}/etc"
        self.log = f"{self.root}/log"
        self.run = f"{self.root}/run"
        self.stamps = f"{self.root}/stamps"
        self.mysql = f"{self.root}/mysql"
        self.sock = f"{self.run}/mysql.sock"
        self.rabbit = f"{self.root}/rabbitmq"
        self.keystone = f"{self.root}/keystone"
        self.glance = f"{self.root}/glance"
        self.nova = f"{self.root}/nova"
        self.nova2 = f"{self.root}/nova2"  # the second nova-compute's state
        self.neutron = f"{self.root}/neutron"
        self.swift = f"{self.root}/swift"  # rings
        self.swift_devices = f"{self.root}/swift/node"
        self.locks = f"{self.root}/locks"
        self.clouds = f"{self.root}/clouds.yaml"

    def makedirs(self) -> None:
        for d in (self.etc, self.log, self.run, self.stamps, self.rabbit, self.locks,
                  f"{self.keystone}/fernet-keys", f"{self.keystone}/credential-keys",
                  f"{self.glance}/images", f"{self.glance}/staging", f"{self.glance}/tasks",
                  f"{self.nova}/instances", f"{self.nova2}/instances", f"{self.nova2}/locks",
                  self.neutron, f"{self.swift_devices}/d1",
                  *(f"{self.etc}/{p}" for p in ("keystone", "glance", "placement", "nova", "neutron", "rabbitmq",
                                                  "swift"))):
            os.makedirs(d, exist_ok=True)

    def pidfile(self, name: str) -> str:
        return f"{self.run}/{name}.pid"

    def stamp(self, name: str) -> str:
        return f"{self.stamps}/{name}"

    def db(self, name: str) -> str:
        return f"mysql+pymysql://cloudfs:{PASSWORD}@localhost/{name}?unix_socket={self.sock}&charset=utf8"


def load_ports(L: Layout, base: int | None) -> None:
    """Set PORTS for ``L``: kept from an earlier start, else the standard
    ones or ``base`` … ``base+7``.  Failed if a start asks for other ports
    than the state directory already has."""
    path = f"{L.root}/ports.json"
    want = STANDARD_PORTS if base is None else {k: base + i for i, k in enumerate(STANDARD_PORTS)}
    try:
        with open(path) as f:
            have = json.load(f)
    except FileNotFoundError:
        have = None
    if have is not None and base is not None and any(have[k] != want[k] for k in have if k in want):
        raise Failed(f"{L.root} was started on ports {have}; not {want}")
    missing = have is not None and any(k not in have for k in want)
    if missing:  # a state dir from before Swift: its new services take the new ports
        have = {**{k: v for k, v in want.items() if k not in have}, **have}
    PORTS.clear()
    PORTS.update(have or want)
    if have is None or missing:
        os.makedirs(L.root, exist_ok=True)
        with open(path, "w") as f:
            json.dump(PORTS, f)


def ensure_free(name: str, port: int) -> None:
    """Failed if something already listens on 127.0.0.1:``port`` (another
    control plane: glance and neutron would share it through SO_REUSEPORT)."""
    if port_open(port):
        raise Failed(f"port {port} for {name} is in use by another program (another control plane? "
                     f"use --port-base)")


# ---------------------------------------------------------------- configs

def ini(sections: dict[str, dict[str, object]]) -> str:
    out = []
    for sec, kv in sections.items():
        out.append(f"[{sec}]")
        out.extend(f"{k} = {v}" for k, v in kv.items())
        out.append("")
    return "\n".join(out)


def authtoken(L: Layout) -> dict[str, object]:
    ks = f"http://127.0.0.1:{PORTS['keystone']}"
    return {"www_authenticate_uri": f"{ks}/v3", "auth_url": f"{ks}/v3", "auth_type": "password",
            "project_domain_name": "Default", "user_domain_name": "Default",
            "project_name": "admin", "username": "admin", "password": PASSWORD,
            "region_name": REGION}


def service_auth(L: Layout) -> dict[str, object]:
    a = authtoken(L)
    return {k: a[k] for k in ("auth_url", "auth_type", "project_domain_name", "user_domain_name",
                              "project_name", "username", "password", "region_name")}


def write_configs(L: Layout) -> None:
    transport = f"rabbit://guest:guest@127.0.0.1:{PORTS['rabbit']}/"
    common = {"debug": "false", "use_stderr": "true", "transport_url": transport}
    msg = {"driver": "noop"}
    # No AMQP heartbeats (both ends): nova-api under uwsgi cannot send them
    # while idle, so RabbitMQ closed its connections after 60 s and the
    # next cast (e.g. a boot's schedule_and_build_instances) was written to
    # a dead socket and lost: the server stayed in BUILD/scheduling for ever.
    # On loopback a dead peer shows as a closed connection anyway.
    rabbit = {"heartbeat_timeout_threshold": 0}
    files = {}
    files["keystone/keystone.conf"] = ini({
        "DEFAULT": {"debug": "false", "use_stderr": "true"},
        "database": {"connection": L.db("keystone")},
        "token": {"provider": "fernet", "expiration": 86400},
        "fernet_tokens": {"key_repository": f"{L.keystone}/fernet-keys"},
        "fernet_receipts": {"key_repository": f"{L.keystone}/fernet-keys"},
        "credential": {"key_repository": f"{L.keystone}/credential-keys"},
        "cache": {"enabled": "false"},
    })
    files["placement/placement.conf"] = ini({
        "DEFAULT": {"debug": "false", "use_stderr": "true"},
        "api": {"auth_strategy": "keystone"},
        "placement_database": {"connection": L.db("placement")},
        "keystone_authtoken": authtoken(L),
    })
    files["glance/glance-api.conf"] = ini({
        "DEFAULT": {"debug": "false", "use_stderr": "true", "bind_host": "127.0.0.1",
                    "bind_port": PORTS["glance"], "workers": 1, "enabled_backends": "local:file",
                    "image_cache_dir": f"{L.glance}/cache", "show_image_direct_url": "false",
                    # eventlet keep-alive: pooled client connections get reset
                    "http_keepalive": "false"},
        "database": {"connection": L.db("glance")},
        "glance_store": {"default_backend": "local"},
        "local": {"filesystem_store_datadir": f"{L.glance}/images"},
        "os_glance_staging_store": {"filesystem_store_datadir": f"{L.glance}/staging"},
        "os_glance_tasks_store": {"filesystem_store_datadir": f"{L.glance}/tasks"},
        "keystone_authtoken": authtoken(L),
        "paste_deploy": {"flavor": "keystone", "config_file": "/etc/glance/glance-api-paste.ini"},
        "oslo_concurrency": {"lock_path": L.locks},
        "oslo_messaging_notifications": msg,
    })
    files["neutron/neutron.conf"] = ini({
        "DEFAULT": {**common, "bind_host": "127.0.0.1", "bind_port": PORTS["neutron"],
                    "core_plugin": "ml2", "service_plugins": "", "auth_strategy": "keystone",
                    "allow_overlapping_ips": "true", "api_workers": 1, "rpc_workers": 1,
                    "rpc_state_report_workers": 0,
                    "api_paste_config": "/etc/neutron/api-paste.ini", "state_path": L.neutron,
                    "notify_nova_on_port_status_changes": "false",
                    "notify_nova_on_port_data_changes": "false",
                    "dhcp_agent_notification": "false",
                    # eventlet keep-alive: pooled client connections get reset
                    "wsgi_keep_alive": "false",
                    # our one agent row never reports; keep it alive for
                    # 23 days (``start`` refreshes it).  Not more: neutron's
                    # agent-status worker sleeps up to this many seconds and
                    # eventlet's epoll takes at most 2**31-1 ms, so a larger
                    # value crashes that worker ("OverflowError: timeout is
                    # too large") two minutes in, and neutron-server then
                    # restarts every worker, the API one too, every 3 minutes
                    "agent_down_time": 2_000_000},
        "database": {"connection": L.db("neutron"), "max_pool_size": 20, "max_overflow": 40},
        "keystone_authtoken": authtoken(L),
        "oslo_concurrency": {"lock_path": L.locks},
        "oslo_messaging_notifications": msg,
        "quotas": {"quota_network": -1, "quota_subnet": -1, "quota_port": -1},
        "oslo_messaging_rabbit": rabbit,
    })
    files["neutron/ml2_conf.ini"] = ini({
        "ml2": {"type_drivers": "flat,vlan,vxlan", "tenant_network_types": "vxlan",
                "mechanism_drivers": "openvswitch", "extension_drivers": "port_security"},
        "ml2_type_vxlan": {"vni_ranges": "1:100000"},
    })
    files["nova/nova.conf"] = ini({
        "DEFAULT": {**common, "host": HOST, "my_ip": "127.0.0.1", "state_path": L.nova,
                    "instances_path": f"{L.nova}/instances", "compute_driver": "fake.FakeDriver",
                    "report_interval": 2, "service_down_time": 60,
                    "vif_plugging_is_fatal": "false", "vif_plugging_timeout": 0,
                    "heal_instance_info_cache_interval": -1},
        "api": {"auth_strategy": "keystone"},
        "api_database": {"connection": L.db("nova_api"), "max_pool_size": 10, "max_overflow": 40},
        "database": {"connection": L.db("nova"), "max_pool_size": 10, "max_overflow": 40},
        "keystone_authtoken": authtoken(L),
        "placement": service_auth(L),
        "neutron": service_auth(L),
        "glance": {"region_name": REGION},
        "conductor": {"workers": 1},
        "scheduler": {"workers": 1},
        "quota": {"instances": -1, "cores": -1, "ram": -1},
        # free RAM alone decides between the hosts (see HOST2_RESERVED_MB);
        # all weighers would let the CPU and I/O weighers, and a host's
        # build failures, send a boot to either host
        "filter_scheduler": {"weight_classes": "nova.scheduler.weights.ram.RAMWeigher"},
        "oslo_concurrency": {"lock_path": L.locks},
        "oslo_messaging_notifications": msg,
        "oslo_messaging_rabbit": rabbit,
        "notifications": {"notification_format": "unversioned"},
        "vnc": {"enabled": "false"},
        "wsgi": {"api_paste_config": f"{L.etc}/nova/api-paste.ini"},
    })
    # the second nova-compute: nova.conf, then this (later files win)
    files["nova/nova-compute2.conf"] = ini({
        "DEFAULT": {"host": HOST2, "state_path": L.nova2, "instances_path": f"{L.nova2}/instances",
                    "reserved_host_memory_mb": HOST2_RESERVED_MB},
        "oslo_concurrency": {"lock_path": f"{L.nova2}/locks"},
    })
    files["rabbitmq/rabbitmq.conf"] = "\n".join([
        f"listeners.tcp.default = 127.0.0.1:{PORTS['rabbit']}",
        "loopback_users.guest = true",
        "heartbeat = 0",
        "disk_free_limit.absolute = 50MB",
        "log.console = false",
        "",
    ])
    files["rabbitmq/enabled_plugins"] = "[].\n"
    for name, (port, ring) in SWIFT.items():
        base = {"bind_ip": "127.0.0.1", "bind_port": PORTS[port], "swift_dir": L.swift, "workers": 1,
                "user": "root", "log_name": name}
        if ring is not None:
            files[f"swift/{ring}-server.conf"] = ini({
                "DEFAULT": {**base, "devices": L.swift_devices, "mount_check": "false"},
                "pipeline:main": {"pipeline": f"{ring}-server"},
                f"app:{ring}-server": {"use": f"egg:swift#{ring}"},
            })
            continue
        files["swift/proxy-server.conf"] = ini({
            "DEFAULT": base,
            "pipeline:main": {"pipeline": "catch_errors gatekeeper healthcheck proxy-logging listing_formats "
                                          "authtoken keystoneauth copy slo dlo proxy-logging proxy-server"},
            "app:proxy-server": {"use": "egg:swift#proxy", "account_autocreate": "true"},
            "filter:catch_errors": {"use": "egg:swift#catch_errors"},
            "filter:gatekeeper": {"use": "egg:swift#gatekeeper"},
            "filter:healthcheck": {"use": "egg:swift#healthcheck"},
            "filter:proxy-logging": {"use": "egg:swift#proxy_logging"},
            "filter:listing_formats": {"use": "egg:swift#listing_formats"},
            "filter:copy": {"use": "egg:swift#copy"},
            "filter:slo": {"use": "egg:swift#slo"},
            "filter:dlo": {"use": "egg:swift#dlo"},
            "filter:keystoneauth": {"use": "egg:swift#keystoneauth", "operator_roles": "admin, member"},
            "filter:authtoken": {"paste.filter_factory": "keystonemiddleware.auth_token:filter_factory",
                                 "delay_auth_decision": "true", **authtoken(L)},
        })
    files["rabbitmq/rabbitmq-env.conf"] = ""
    for rel, text in files.items():
        path = f"{L.etc}/{rel}"
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    shutil.copyfile("/etc/nova/api-paste.ini", f"{L.etc}/nova/api-paste.ini")


# ---------------------------------------------------------------- processes

def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def read_pid(L: Layout, name: str) -> int | None:
    try:
        with open(L.pidfile(name)) as f:
            pid = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if alive(pid) else None


#: Which port each service listens on (checked free before it starts).
SERVICE_PORT = {"rabbitmq": "rabbit", "keystone": "keystone", "placement": "placement",
                "glance": "glance", "neutron": "neutron", "nova-api": "nova",
                **{name: port for name, (port, _) in SWIFT.items()}}


def spawn(L: Layout, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    """Start ``argv`` as a new session (its own process group, so stopping
    the group stops its workers), output appended to ``log/NAME.log``."""
    if name in SERVICE_PORT:
        ensure_free(name, PORTS[SERVICE_PORT[name]])
    full_env = dict(os.environ)
    for k in list(full_env):
        if k.startswith("OS_") or k.startswith("RABBITMQ_") or k.startswith("ERL_"):
            del full_env[k]
    full_env.update(env or {})
    with open(f"{L.log}/{name}.log", "ab") as out:
        out.write(f"\n==== {datetime.datetime.now().isoformat()} {' '.join(argv)}\n".encode())
        out.flush()
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=full_env, cwd=L.root, start_new_session=True)
    with open(L.pidfile(name), "w") as f:
        f.write(f"{p.pid}\n")
    return p.pid


def check_alive(L: Layout, name: str) -> None:
    if read_pid(L, name) is None:
        raise Failed(f"{name} exited; see {L.log}/{name}.log:\n{tail(f'{L.log}/{name}.log')}")


def tail(path: str, n: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def wait_until(what: str, pred, timeout: float, L: Layout | None = None, watch: list[str] = ()) -> None:
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        try:
            if pred():
                if time.monotonic() - t0 > 2:
                    log(f"waited {time.monotonic() - t0:.0f}s for {what}")
                return
        except Exception as e:  # not ready yet
            last = e
        else:
            last = None
        if L is not None:
            for name in watch:
                check_alive(L, name)
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout:.0f}s waiting for {what}" + (f": {last}" if last else ""))
        time.sleep(0.25)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_ok(url: str) -> bool:
    import urllib.request
    import urllib.error
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except OSError:
        return False


def run(L: Layout, name: str, argv: list[str], env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run one setup command, output to ``log/setup-NAME.log``."""
    full_env = dict(os.environ, **(env or {}))
    with open(f"{L.log}/setup-{name}.log", "ab") as out:
        r = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env)
    if check and r.returncode != 0:
        raise Failed(f"{' '.join(argv)} failed ({r.returncode}); see {L.log}/setup-{name}.log:\n"
                     f"{tail(f'{L.log}/setup-{name}.log')}")
    return r


def rabbit_env(L: Layout) -> dict[str, str]:
    return {
        "HOME": L.rabbit,
        "RABBITMQ_NODENAME": "cloudfs@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(PORTS["rabbit"]),
        "RABBITMQ_DIST_PORT": str(PORTS["rabbit_dist"]),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "ERL_EPMD_PORT": str(PORTS["epmd"]),
        "RABBITMQ_CONF_ENV_FILE": f"{L.etc}/rabbitmq/rabbitmq-env.conf",
        "RABBITMQ_CONFIG_FILE": f"{L.etc}/rabbitmq/rabbitmq.conf",
        "RABBITMQ_ENABLED_PLUGINS_FILE": f"{L.etc}/rabbitmq/enabled_plugins",
        "RABBITMQ_MNESIA_BASE": f"{L.rabbit}/mnesia",
        "RABBITMQ_LOG_BASE": f"{L.log}/rabbitmq",
        "RABBITMQ_PID_FILE": f"{L.run}/rabbitmq-beam.pid",
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        "RABBITMQ_CTL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
    }


def uwsgi(L: Layout, name: str, port: int, script: str, env: dict[str, str], processes: int) -> None:
    spawn(L, name, [
        "uwsgi", "--plugin", "python3", "--http-socket", f"127.0.0.1:{port}",
        "--wsgi-file", script, "--need-app", "--add-header", "Connection: close",
        "--master", "--processes", str(processes), "--threads", "1", "--enable-threads",
        "--lazy-apps", "--die-on-term", "--buffer-size", "65535", "--listen", "100",
    ], env)


# ---------------------------------------------------------------- SQL

def sql_root(L: Layout, query: str) -> None:
    """Run statements as MariaDB's root (unix-socket authentication, via the CLI)."""
    subprocess.run(["mariadb", f"--socket={L.sock}", "-u", "root", "-e", query], check=True,
                   capture_output=True, timeout=30)


def sql(L: Layout, query: str, args: tuple = (), db: str | None = None) -> list[tuple]:
    """One query as the ``cloudfs`` database user; rows as tuples."""
    import pymysql
    conn = pymysql.connect(unix_socket=L.sock, user="cloudfs", password=PASSWORD,
                           database=db, autocommit=True, connect_timeout=5)
    try:
        with conn.cursor() as c:
            c.execute(query, args)
            return list(c.fetchall())
    finally:
        conn.close()


# ---------------------------------------------------------------- steps

def start_mariadb(L: Layout) -> None:
    if read_pid(L, "mariadb") is None:
        fresh = not os.path.exists(f"{L.mysql}/mysql")
        if fresh:
            shutil.rmtree(L.mysql, ignore_errors=True)
            run(L, "mariadb-install-db", ["mariadb-install-db", "--no-defaults", f"--datadir={L.mysql}",
                                          "--user=root", "--auth-root-authentication-method=socket",
                                          "--skip-test-db", "--skip-name-resolve"])
        spawn(L, "mariadb", [
            "mariadbd", "--no-defaults", f"--datadir={L.mysql}", f"--socket={L.sock}",
            f"--pid-file={L.run}/mariadbd.pid", "--skip-networking", "--user=root",
            "--skip-name-resolve", "--skip-log-bin", "--innodb-flush-log-at-trx-commit=0",
            "--innodb-doublewrite=0", "--innodb-buffer-pool-size=256M", "--max-connections=2000",
            "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci",
            "--innodb-flush-method=nosync", "--sync-frm=0",
        ])
    wait_until("mariadb socket", lambda: os.path.exists(L.sock) and sql_root_ok(L), 60, L, ["mariadb"])
    if not os.path.exists(L.stamp("databases")):
        stmts = [f"CREATE DATABASE IF NOT EXISTS {d} CHARACTER SET utf8" for d in DATABASES]
        stmts += [f"CREATE USER IF NOT EXISTS 'cloudfs'@'localhost' IDENTIFIED BY '{PASSWORD}'",
                  "GRANT ALL PRIVILEGES ON *.* TO 'cloudfs'@'localhost'"]
        sql_root(L, ";\n".join(stmts))
        touch(L.stamp("databases"))


def sql_root_ok(L: Layout) -> bool:
    sql_root(L, "SELECT 1")
    return True


def touch(path: str) -> None:
    with open(path, "w"):
        pass


def start_rabbitmq(L: Layout) -> None:
    if read_pid(L, "rabbitmq") is None:
        spawn(L, "rabbitmq", ["/usr/lib/rabbitmq/bin/rabbitmq-server"], rabbit_env(L))


def wait_rabbitmq(L: Layout) -> None:
    wait_until("rabbitmq on 127.0.0.1:5672", lambda: port_open(PORTS["rabbit"]), 90, L, ["rabbitmq"])


def db_sync(L: Layout, ex: ThreadPoolExecutor) -> dict:
    """Schema migrations (each once per state dir), in parallel on ``ex``:
    futures by service, so each service starts as soon as its database is
    ready."""
    nova = ["--config-file", f"{L.etc}/nova/nova.conf"]

    def keystone():
        env = {"OS_KEYSTONE_CONFIG_DIR": f"{L.etc}/keystone"}
        kc = ["--config-file", f"{L.etc}/keystone/keystone.conf"]
        run(L, "keystone", ["keystone-manage", *kc, "db_sync"], env)
        run(L, "keystone", ["keystone-manage", *kc, "fernet_setup", "--keystone-user", "root", "--keystone-group", "root"], env)
        run(L, "keystone", ["keystone-manage", *kc, "credential_setup", "--keystone-user", "root", "--keystone-group", "root"], env)
        ks = f"http://127.0.0.1:{PORTS['keystone']}/v3/"
        run(L, "keystone", ["keystone-manage", *kc, "bootstrap", "--bootstrap-password", PASSWORD,
                            "--bootstrap-admin-url", ks, "--bootstrap-internal-url", ks,
                            "--bootstrap-public-url", ks, "--bootstrap-region-id", REGION], env)

    def glance():
        run(L, "glance", ["glance-manage", "--config-file", f"{L.etc}/glance/glance-api.conf", "db_sync"])

    def placement():
        run(L, "placement", ["placement-manage", "--config-file", f"{L.etc}/placement/placement.conf", "db", "sync"])

    def nova_dbs():
        run(L, "nova", ["nova-manage", *nova, "api_db", "sync"])
        run(L, "nova", ["nova-manage", *nova, "cell_v2", "map_cell0", "--database_connection", L.db("nova_cell0")])
        cells = run(L, "nova", ["nova-manage", *nova, "cell_v2", "list_cells"], check=False)
        have = sql(L, "SELECT name FROM cell_mappings", db="nova_api")
        if ("cell1",) not in have:
            run(L, "nova", ["nova-manage", *nova, "cell_v2", "create_cell", "--name", "cell1", "--verbose"])
        del cells
        run(L, "nova", ["nova-manage", *nova, "db", "sync"])

    def neutron():
        run(L, "neutron", ["neutron-db-manage", "--config-file", f"{L.etc}/neutron/neutron.conf",
                           "--config-file", f"{L.etc}/neutron/ml2_conf.ini", "upgrade", "heads"])

    steps = {"keystone": keystone, "glance": glance, "placement": placement, "nova": nova_dbs, "neutron": neutron}
    t0 = time.monotonic()

    def step(k: str) -> None:
        if not os.path.exists(L.stamp(f"db-{k}")):
            steps[k]()
            touch(L.stamp(f"db-{k}"))
            log(f"{k} database ready after {time.monotonic() - t0:.0f}s")

    return {k: ex.submit(step, k) for k in steps}


def keystone_session():
    from keystoneauth1 import session
    from keystoneauth1.identity import v3
    auth = v3.Password(auth_url=f"http://127.0.0.1:{PORTS['keystone']}/v3", username="admin",
                       password=PASSWORD, project_name="admin", user_domain_name="Default",
                       project_domain_name="Default")
    return session.Session(auth=auth)


def catalog(L: Layout) -> None:
    """Services and endpoints (idempotent)."""
    s = keystone_session()
    ks = f"http://127.0.0.1:{PORTS['keystone']}/v3"
    want = {
        "image": ("glance", f"http://127.0.0.1:{PORTS['glance']}"),
        "placement": ("placement", f"http://127.0.0.1:{PORTS['placement']}"),
        "compute": ("nova", f"http://127.0.0.1:{PORTS['nova']}/v2.1"),
        "network": ("neutron", f"http://127.0.0.1:{PORTS['neutron']}"),
        "object-store": ("swift", f"http://127.0.0.1:{PORTS['swift']}/v1/AUTH_%(project_id)s"),
    }
    services = {x["type"]: x for x in s.get(f"{ks}/services").json()["services"]}
    endpoints = s.get(f"{ks}/endpoints").json()["endpoints"]
    for typ, (name, url) in want.items():
        svc = services.get(typ)
        if svc is None:
            svc = s.post(f"{ks}/services", json={"service": {"type": typ, "name": name}}).json()["service"]
        have = {e["interface"] for e in endpoints if e["service_id"] == svc["id"]}
        for iface in ("public", "internal", "admin"):
            if iface not in have:
                s.post(f"{ks}/endpoints", json={"endpoint": {"service_id": svc["id"], "interface": iface,
                                                             "url": url, "region_id": REGION}})


def agent_row(L: Layout) -> None:
    """An openvswitch agent row for each compute host, so ML2 binds ports
    there (no agent process runs: nothing is plugged on this machine)."""
    for host in COMPUTES.values():
        agent_row_for(L, host)


def agent_row_for(L: Layout, host: str) -> None:
    """The openvswitch agent row for compute host ``host``."""
    conf = json.dumps({"bridge_mappings": {}, "tunnel_types": ["vxlan"], "integration_bridge": "br-int",
                       "tunneling_ip": "127.0.0.1", "l2_population": False, "datapath_type": "system",
                       "ovs_hybrid_plug": False, "enable_distributed_routing": False,
                       "ovs_capabilities": {"datapath_types": ["system"], "iface_types": ["vxlan"]}})
    now = datetime.datetime.utcnow().replace(microsecond=0)
    rows = sql(L, "SELECT id FROM agents WHERE host=%s AND agent_type=%s", (host, "Open vSwitch agent"), db="neutron")
    if rows:
        sql(L, "UPDATE agents SET heartbeat_timestamp=%s, started_at=%s, configurations=%s WHERE id=%s",
            (now, now, conf, rows[0][0]), db="neutron")
        return
    import uuid
    sql(L, "INSERT INTO agents (id, agent_type, `binary`, topic, host, admin_state_up, created_at, started_at,"
           " heartbeat_timestamp, description, configurations, `load`, availability_zone, resources_synced)"
           " VALUES (%s,%s,%s,%s,%s,1,%s,%s,%s,%s,%s,0,NULL,NULL)",
        (str(uuid.uuid4()), "Open vSwitch agent", "neutron-openvswitch-agent", "N/A", host, now, now, now,
         "row inserted by cloudfs controlplane.py", conf), db="neutron")


def service_fresh(L: Layout, binary: str, since: datetime.datetime, host: str = HOST) -> bool:
    """Whether Nova service ``binary`` on ``host`` reported (heartbeat,
    ``updated_at``, UTC) at or after ``since``."""
    rows = sql(L, "SELECT updated_at FROM services WHERE host=%s AND `binary`=%s AND deleted=0",
               (host, binary), db="nova")
    return bool(rows) and rows[0][0] is not None and rows[0][0] >= since


def compute_mapped(L: Layout) -> bool:
    """Whether every compute host has its compute node and is mapped to
    cell1 (``nova-manage cell_v2 discover_hosts`` once all have nodes: it
    maps them in one run)."""
    hosts = list(COMPUTES.values())
    for host in hosts:
        if not sql(L, "SELECT id FROM compute_nodes WHERE host=%s AND deleted=0", (host,), db="nova"):
            return False
    mapped = lambda: {h for (h,) in sql(L, "SELECT host FROM host_mappings", db="nova_api")}  # noqa: E731
    if not set(hosts) <= mapped():
        run(L, "nova", ["nova-manage", "--config-file", f"{L.etc}/nova/nova.conf", "cell_v2", "discover_hosts"])
    return set(hosts) <= mapped()


def placement_ready(L: Layout) -> bool:
    """Whether every compute host's resource provider has its inventory."""
    return all(sql(L, "SELECT i.id FROM inventories i JOIN resource_providers r ON r.id=i.resource_provider_id"
                      " WHERE r.name=%s", (host,), db="placement") for host in COMPUTES.values())


def seed(L: Layout) -> None:
    """Image ``tiny``, flavors, network ``user`` (idempotent)."""
    s = keystone_session()
    g = f"http://127.0.0.1:{PORTS['glance']}/v2"
    images = s.get(f"{g}/images?name=tiny").json()["images"]
    if not [i for i in images if i["status"] == "active"]:
        for i in images:
            s.delete(f"{g}/images/{i['id']}")
        img = s.post(f"{g}/images", json={"name": "tiny", "disk_format": "raw", "container_format": "bare",
                                          "visibility": "public", "min_disk": 0, "min_ram": 0}).json()
        data = b"cloudfs tiny image\n" + bytes(1 << 20)
        s.put(f"{g}/images/{img['id']}/file", data=data, headers={"Content-Type": "application/octet-stream"})
    n = f"http://127.0.0.1:{PORTS['nova']}/v2.1"
    have = {f["name"] for f in s.get(f"{n}/flavors").json()["flavors"]}
    for name, ram, vcpus, disk in (("m1.tiny", 64, 1, 1), ("m1.small", 512, 1, 2)):
        if name not in have:
            s.post(f"{n}/flavors", json={"flavor": {"name": name, "ram": ram, "vcpus": vcpus, "disk": disk}})
    q = f"http://127.0.0.1:{PORTS['neutron']}/v2.0"
    nets = s.get(f"{q}/networks?name=user").json()["networks"]
    net = nets[0] if nets else s.post(f"{q}/networks", json={"network": {"name": "user", "shared": True}}).json()["network"]
    if not net.get("subnets"):
        s.post(f"{q}/subnets", json={"subnet": {"network_id": net["id"], "name": "user", "ip_version": 4,
                                               "cidr": "10.0.0.0/24"}})


def write_clouds(L: Layout) -> None:
    text = (
        "# written by scripts/openstack/controlplane.py\n"
        "clouds:\n"
        "  cloudfs:\n"
        "    auth:\n"
        f"      auth_url: http://127.0.0.1:{PORTS['keystone']}/v3\n"
        "      username: admin\n"
        f"      password: {PASSWORD}\n"
        "      project_name: admin\n"
        "      user_domain_name: Default\n"
        "      project_domain_name: Default\n"
        f"    region_name: {REGION}\n"
        "    interface: public\n"
        "    identity_api_version: 3\n"
    )
    with open(L.clouds + ".tmp", "w") as f:
        f.write(text)
    os.replace(L.clouds + ".tmp", L.clouds)


def nova_compute_argv(L: Layout, name: str = "nova-compute") -> list[str]:
    """The command line of nova-compute service ``name`` (a COMPUTES key):
    nova.conf, and for the second its own file over it."""
    extra = [] if name == "nova-compute" else ["--config-file", f"{L.etc}/nova/{name}.conf"]
    return ["/usr/bin/python3", "-c", "import sys; from nova.cmd.compute import main; sys.exit(main())",
            "--config-file", f"{L.etc}/nova/nova.conf", *extra]


def retried(what: str, fn, tries: int = 4) -> None:
    """Run an API step, again after a pause if a service hiccups (a
    freshly started eventlet server may drop the first connections)."""
    for i in range(tries):
        try:
            return fn()
        except Exception as e:  # keystoneauth/requests errors: try again
            if i == tries - 1:
                raise Failed(f"{what} failed: {type(e).__name__}: {e}") from e
            log(f"{what}: {type(e).__name__}: {e}; again")
            time.sleep(2)


def swift_rings(L: Layout) -> None:
    """One-replica rings (2^6 partitions) with the one device d1 of each
    server, made again each start (ports may differ)."""
    for name, (port, ring) in SWIFT.items():
        if ring is None:
            continue
        builder = f"{L.swift}/{ring}.builder"
        for f in (builder, f"{L.swift}/{ring}.ring.gz"):
            if os.path.exists(f):
                os.unlink(f)
        run(L, "swift-rings", ["swift-ring-builder", builder, "create", "6", "1", "1"])
        run(L, "swift-rings", ["swift-ring-builder", builder, "add", f"r1z1-127.0.0.1:{PORTS[port]}/d1", "100"])
        # rebalance exits 1 for warnings (e.g. fewer devices than replicas would like)
        r = run(L, "swift-rings", ["swift-ring-builder", builder, "rebalance"], check=False)
        if r.returncode not in (0, 1) or not os.path.exists(f"{L.swift}/{ring}.ring.gz"):
            raise Failed(f"swift-ring-builder {ring} rebalance failed; see {L.log}/setup-swift-rings.log")


def launchers(L: Layout) -> dict:
    """How each service (but MariaDB and RabbitMQ) is started: name → a
    function that spawns it (``start`` and ``start_services`` share them)."""
    nova_env = {"OS_NOVA_CONFIG_DIR": f"{L.etc}/nova"}
    nova_conf = ["--config-file", f"{L.etc}/nova/nova.conf"]
    swift = {name: (lambda name=name, ring=ring: spawn(L, name, [f"/usr/bin/swift-{ring or 'proxy'}-server",
                                                               f"{L.etc}/swift/{ring or 'proxy'}-server.conf"]))
             for name, (_, ring) in SWIFT.items()}
    return {
        **swift,
        "keystone": lambda: uwsgi(L, "keystone", PORTS["keystone"], "/usr/bin/keystone-wsgi-public",
                                  {"OS_KEYSTONE_CONFIG_DIR": f"{L.etc}/keystone"}, 2),
        "placement": lambda: uwsgi(L, "placement", PORTS["placement"], "/usr/bin/placement-api",
                                   {"OS_PLACEMENT_CONFIG_DIR": f"{L.etc}/placement"}, 2),
        "glance": lambda: spawn(L, "glance", ["glance-api", "--config-file", f"{L.etc}/glance/glance-api.conf"]),
        "nova-api": lambda: uwsgi(L, "nova-api", PORTS["nova"], "/usr/bin/nova-api-wsgi", nova_env, 4),
        "nova-conductor": lambda: spawn(L, "nova-conductor", ["/usr/bin/nova-conductor", *nova_conf]),
        "nova-scheduler": lambda: spawn(L, "nova-scheduler", ["/usr/bin/nova-scheduler", *nova_conf]),
        "neutron": lambda: spawn(L, "neutron", ["neutron-server", "--config-file", f"{L.etc}/neutron/neutron.conf",
                                                "--config-file", f"{L.etc}/neutron/ml2_conf.ini"]),
        **{name: (lambda name=name: spawn(L, name, nova_compute_argv(L, name))) for name in COMPUTES},
    }


def start(state: str, port_base: int | None = None) -> None:
    """Start every service not running, then wait until ready."""
    t0 = time.monotonic()
    L = Layout(state)
    L.makedirs()
    load_ports(L, port_base)
    write_configs(L)
    start_rabbitmq(L)
    start_mariadb(L)
    spawners = launchers(L)
    with ThreadPoolExecutor(5) as ex:
        dbs = db_sync(L, ex)
        started: dict[str, datetime.datetime] = {}

        def launch(name: str) -> None:
            if read_pid(L, name) is None:
                started[name] = datetime.datetime.utcnow().replace(microsecond=0) - datetime.timedelta(seconds=1)
                spawners[name]()

        dbs["keystone"].result()
        launch("keystone")
        wait_rabbitmq(L)
        wait_until("keystone", lambda: http_ok(f"http://127.0.0.1:{PORTS['keystone']}/v3"), 60, L, ["keystone"])
        retried("service catalog", lambda: catalog(L))
        dbs["placement"].result()
        launch("placement")
        dbs["glance"].result()
        launch("glance")
        dbs["nova"].result()
        launch("nova-api")
        for svc in ("nova-conductor", "nova-scheduler"):
            launch(svc)
        dbs["neutron"].result()
        agent_row(L)
        launch("neutron")
        swift_rings(L)
        for name in SWIFT:
            launch(name)
    epoch = datetime.datetime(1970, 1, 1)
    # a conductor heartbeat comes after its RPC server consumes
    wait_until("nova-conductor consuming", lambda: service_fresh(L, "nova-conductor", started.get("nova-conductor", epoch)),
               90, L, ["nova-conductor"])
    for name in COMPUTES:
        launch(name)
    apis = {"placement": PORTS["placement"], "glance": PORTS["glance"], "neutron": PORTS["neutron"],
            "nova-api": PORTS["nova"]}
    for name, port in apis.items():
        wait_until(name, lambda port=port: http_ok(f"http://127.0.0.1:{port}/"), 90, L, [name])
    wait_until("nova-scheduler consuming", lambda: service_fresh(L, "nova-scheduler", started.get("nova-scheduler", epoch)),
               90, L, ["nova-scheduler"])
    for name, host in COMPUTES.items():
        wait_until(f"a fresh {name} heartbeat ({host})",
                   lambda name=name, host=host: service_fresh(L, "nova-compute", started.get(name, epoch), host),
                   90, L, [name])
    wait_until("compute hosts mapped to cell1", lambda: compute_mapped(L), 60, L, list(COMPUTES))
    wait_until("compute resources in placement", lambda: placement_ready(L), 60, L, list(COMPUTES))
    wait_until("swift", lambda: http_ok(f"http://127.0.0.1:{PORTS['swift']}/healthcheck")
               and all(port_open(PORTS[p]) for p, _ in SWIFT.values()), 60, L, list(SWIFT))
    retried("image, flavors and network", lambda: seed(L))
    write_clouds(L)
    log(f"ready in {time.monotonic() - t0:.0f}s; OS_CLIENT_CONFIG_FILE={L.clouds} OS_CLOUD=cloudfs")


#: The API services that ``stop STATE NAME…`` / ``start STATE NAME…`` stop
#: and start alone (an outage of one API while the rest keeps running);
#: other names for them (the Debian binaries') are accepted too.
API_SERVICES = ("keystone", "placement", "glance", "neutron", "nova-api")
ALIASES = {"glance-api": "glance", "neutron-server": "neutron", "neutron-api": "neutron",
           "nova": "nova-api", "placement-api": "placement"}


def api_names(names: list[str]) -> list[str]:
    """``names`` as API_SERVICES names (aliases resolved, order kept, no
    duplicates); Failed for any other name."""
    out: list[str] = []
    for n in names:
        name = ALIASES.get(n, n)
        if name not in API_SERVICES:
            raise Failed(f"{n!r} is not an API service that can be stopped alone ({', '.join(API_SERVICES)})")
        if name not in out:
            out.append(name)
    return out


def stop_services(state: str, names: list[str]) -> None:
    """Stop just the API services ``names`` (their whole process groups),
    then make sure nothing answers on their ports any more: a client's
    connection is refused, not left hanging."""
    L = Layout(state)
    load_ports(L, None)
    names = api_names(names)
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(names)) as ex:
        list(ex.map(lambda s: kill_group(L, s), names))
    for name in names:
        port = PORTS[SERVICE_PORT[name]]
        wait_until(f"{name}'s port {port} closed", lambda port=port: not port_open(port), 10)
    log(f"stopped {', '.join(names)} in {time.monotonic() - t0:.1f}s")


def start_services(state: str, names: list[str], timeout: float = 120.0) -> None:
    """Start the API services ``names`` that are not running (on a control
    plane that ``start`` made ready before) and wait until they answer."""
    L = Layout(state)
    load_ports(L, None)
    names = api_names(names)
    t0 = time.monotonic()
    spawners = launchers(L)
    for name in names:
        if read_pid(L, name) is None:
            spawners[name]()
    for name in names:
        port = PORTS[SERVICE_PORT[name]]
        wait_until(name, lambda port=port: http_ok(f"http://127.0.0.1:{port}/"), timeout, L, [name])
    log(f"started {', '.join(names)} in {time.monotonic() - t0:.1f}s")


#: Services under uwsgi: SIGINT to the master stops it and its workers at once.
UWSGI = {"keystone", "placement", "nova-api"}
#: Services whose parent stops its workers itself, so SIGTERM goes to the
#: parent alone: neutron-server's oslo.service workers reset their SIGTERM
#: handler on the first SIGTERM, so a group-wide one followed by the
#: parent's own makes a worker die "killed by signal 15" (which the health
#: check, tests/scripts/test_openstack_controlplane.py, counts as a crash).
PARENT_STOPS = {"neutron"}


def kill_group(L: Layout, name: str, timeout: float = 20.0) -> None:
    """Stop service ``name``: SIGTERM to its process group (SIGINT to the
    master for uwsgi, SIGTERM to the parent alone for PARENT_STOPS), SIGKILL
    to the group after ``timeout`` seconds."""
    pid = read_pid(L, name)
    if pid is None:
        try:
            os.unlink(L.pidfile(name))
        except FileNotFoundError:
            pass
        return
    try:
        if name in UWSGI:
            os.kill(pid, signal.SIGINT)
        elif name in PARENT_STOPS:
            if not wait_until_quiet(lambda: settled_workers(pid), 60):
                log(f"{name}'s workers have not settled after 60 s; stopping it anyway")
            os.kill(pid, signal.SIGTERM)
        else:
            os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and group_alive(pid):
        time.sleep(0.1)
    if group_alive(pid):
        log(f"{name} did not stop on SIGTERM; SIGKILL")
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while group_alive(pid):
            time.sleep(0.1)
    os.unlink(L.pidfile(name))


#: Seconds a neutron-server worker must have lived before the parent's
#: SIGTERM: oslo.service installs the worker's own SIGTERM handler and then
#: starts its service (seconds on a loaded host), and a SIGTERM meanwhile
#: kills it "killed by signal 15".  (Its signal mask cannot tell: a forked
#: worker inherits the parent's handler.)
WORKER_SETTLE_S = 10.0


def settled_workers(parent: int, min_age: float = WORKER_SETTLE_S) -> tuple[int, ...] | None:
    """The pids of ``parent``'s children when there is at least one and
    each has lived ``min_age`` seconds (start time, field 22 of
    /proc/PID/stat, against /proc/uptime; proc(5)); None otherwise."""
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    kids = []
    for pid, fields in live_processes():
        if int(fields[1]) != parent:
            continue
        if uptime - int(fields[19]) / hz < min_age:
            return None
        kids.append(pid)
    return tuple(sorted(kids)) or None


def wait_until_quiet(probe, timeout: float, quiet: float = 2.0) -> bool:
    """Wait until ``probe()`` has given the same value, not None, for
    ``quiet`` seconds (a parent may still be forking workers); False after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = probe()
        if now is None or now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return True
        time.sleep(0.1)
    return False


def live_processes():
    """``(pid, fields)`` of each process that is not a zombie, ``fields``
    being /proc/PID/stat after the command name (``fields[0]`` the state,
    field 3 of proc(5); field N is ``fields[N - 3]``).  A process that ends
    meanwhile is left out."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if len(fields) >= 20 and fields[0] != "Z":
            yield int(d), fields


def group_alive(pgid: int) -> bool:
    """Whether any (non-zombie) process is in process group ``pgid``."""
    return any(int(fields[2]) == pgid for _, fields in live_processes())


def stop(state: str) -> None:
    """Stop everything started from ``state`` (reverse order), then epmd."""
    L = Layout(state)
    if not os.path.isdir(L.run):
        return
    load_ports(L, None)
    rev = [s for s in reversed(SERVICES) if s not in ("mariadb", "rabbitmq")]
    with ThreadPoolExecutor(len(rev)) as ex:
        list(ex.map(lambda s: kill_group(L, s), rev))
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(lambda s: kill_group(L, s, 60.0), ["rabbitmq", "mariadb"]))
    subprocess.run(["epmd", "-kill"], env=dict(os.environ, ERL_EPMD_ADDRESS="127.0.0.1",
                                               ERL_EPMD_PORT=str(PORTS["epmd"])),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log("stopped")


def status(state: str) -> int:
    L = Layout(state)
    load_ports(L, None)
    down = 0
    for s in SERVICES:
        pid = read_pid(L, s)
        print(f"{s:16} {'running pid ' + str(pid) if pid else 'down'}")
        down += pid is None
    return 1 if down else 0


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="A minimal OpenStack on 127.0.0.1 (see the module docstring).")
    ap.add_argument("command", choices=["install", "start", "up", "stop", "status"])
    ap.add_argument("state", nargs="?", help="state directory (all but install)")
    ap.add_argument("services", nargs="*",
                    help=f"start, stop: only these API services ({', '.join(API_SERVICES)}); "
                         "start then only starts and waits for them")
    ap.add_argument("--port-base", type=int, help="ports N … N+11 instead of the standard ones (start, up)")
    a = ap.parse_args(argv)
    if a.command != "install" and not a.state:
        ap.error("a state directory is needed")
    if a.services and a.command not in ("start", "stop"):
        ap.error("only start and stop take service names")
    if a.services and a.port_base is not None:
        ap.error("--port-base is for starting the whole control plane")
    try:
        if a.command in ("install", "up"):
            install()
        if a.command == "start" and a.services:
            start_services(a.state, a.services)
        elif a.command in ("start", "up"):
            start(a.state, a.port_base)
        elif a.command == "stop" and a.services:
            stop_services(a.state, a.services)
        elif a.command == "stop":
            stop(a.state)
        elif a.command == "status":
            return status(a.state)
    except Failed as e:
        log(f"FAILED: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
