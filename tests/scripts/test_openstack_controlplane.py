"""The control plane that scripts/openstack/controlplane.py runs stays whole
for a whole test session: no service restarts its workers and no service
loses its RabbitMQ connection (a cast written to a connection RabbitMQ has
dropped is lost, and a boot then waits in BUILD/scheduling for ever).

It runs after the modules that use the cloud (tests/cloudfs/drivers,
tests/mountd share the session's control plane), so it judges minutes of
real load; run alone it judges the start."""

from __future__ import annotations

import configparser
import importlib.util
import os

from tests.openstack import SCRIPT, openstack_cloud  # noqa: F401

#: log text that means a service broke, and what it means
BROKEN = {
    "Unrecoverable error": "a neutron-server worker crashed (all its workers restart)",
    "killed by signal": "a service's worker process was killed",
    "OverflowError": "an eventlet timer too long for epoll (a config value too large)",
    "missed heartbeats from client": "RabbitMQ dropped a client's connection",
    "recoverable connection/channel error": "a service lost its RabbitMQ connection",
}


def test_no_service_crashed_or_lost_rabbitmq(openstack_cloud):  # noqa: F811
    """From this session's start on (a kept plane's older lines, e.g. of
    stopping it, are not this session's)."""
    found = []
    for path in openstack_cloud.log_files():
        with open(path, errors="replace") as f:
            f.seek(openstack_cloud.session_start.get(path, 0))
            for line in f:
                for marker, meaning in BROKEN.items():
                    if marker in line:
                        found.append(f"{os.path.basename(path)}: {meaning}: {line.strip()[:200]}")
    assert not found, "\n".join(found[:20])


def test_config_values_fit_the_services(tmp_path):
    """The written configs keep neutron's agent_down_time within eventlet's
    epoll range (2**31-1 ms) and AMQP heartbeats off at both ends."""
    spec = importlib.util.spec_from_file_location("controlplane", SCRIPT)
    cp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cp)
    L = cp.Layout(str(tmp_path))
    for sub in ("keystone", "glance", "placement", "nova", "neutron", "rabbitmq", "swift"):
        os.makedirs(f"{L.etc}/{sub}", exist_ok=True)
    cp.write_configs(L)
    neutron = configparser.ConfigParser(interpolation=None)
    neutron.read(f"{L.etc}/neutron/neutron.conf")
    down = int(neutron["DEFAULT"]["agent_down_time"])
    assert down * 1000 <= 2**31 - 1  # ms, as eventlet's epoll takes it
    nova = configparser.ConfigParser(interpolation=None)
    nova.read(f"{L.etc}/nova/nova.conf")
    for conf in (nova, neutron):
        assert conf["oslo_messaging_rabbit"]["heartbeat_timeout_threshold"] == "0"
    with open(f"{L.etc}/rabbitmq/rabbitmq.conf") as f:
        assert "heartbeat = 0" in f.read().splitlines()
