"""cloudfs.znodes: Layout builds every znode path, and parses names read
back from ZooKeeper strictly (anything it would not write is None)."""

import pytest

from cloudfs.znodes import Layout, parse_pid

L = Layout("/cloudfs/prod/")


def test_paths():
    assert L.root == "/cloudfs/prod" and L.id == "/cloudfs/prod/id"
    assert L.record(7) == "/cloudfs/prod/proc/7"
    assert L.kid(7, 9) == L.kid_entry(7, "9") == "/cloudfs/prod/proc/7/kids/9"
    assert L.env_key(7, "k") == "/cloudfs/prod/proc/7/env/k"
    assert L.wait_record(7, "w-0000000003") == L.wait_prefix(7) + "0000000003"
    assert L.pending_item("7-0000000001") == L.pending_prefix(7) + "0000000001"
    assert L.owner(7) == "/cloudfs/prod/owners/7"
    assert L.process_znodes(7, ["a"], ["w-1"], quota=False) == [
        L.env_key(7, "a"), L.wait_record(7, "w-1"), L.wait(7), L.env(7), L.userdata(7), L.kids(7), L.record(7)]
    assert L.process_znodes(7, [], []) == [L.quota(7), L.wait(7), L.env(7), L.userdata(7), L.kids(7), L.record(7)]


@pytest.mark.parametrize("name,pid", [
    ("7", 7), ("1", 1), ("2147483647", 2**31 - 1),
    ("0", None), ("07", None), ("+7", None), ("-7", None), (" 7", None), ("7 ", None), ("x", None),
    ("", None), ("٧", None), ("2147483648", None), ("99999999999", None), ("7.0", None),
])
def test_parse_pid(name, pid):
    assert parse_pid(name) == pid == L.pid_name(name)


@pytest.mark.parametrize("name,pid", [
    ("7-0000000001", 7), ("12-0000000042", 12),
    ("7-", None), ("7", None), ("-0000000001", None), ("07-0000000001", None), ("7-x", None), ("a-1", None),
])
def test_pending_names(name, pid):
    assert L.pending_pid(name) == pid


def test_wait_names_and_pid_lists():
    assert L.is_wait_name("w-0000000001") and not L.is_wait_name("w-") and not L.is_wait_name("x-1")
    assert L.pids(["10", "2", "x", "02", "1"]) == [1, 2, 10] and L.pids(None) == []
