"""cloudfs.process: the record's JSON round trip and status text."""

from cloudfs.process import Process, WaitRecord, init_record


def test_json_round_trip_ignores_unknown_keys():
    p = Process(pid=7, ppid=1, name="web", image="tiny", networks=["user"], addresses=["10.0.0.10"])
    assert Process.from_json(p.to_json()) == p
    raw = p.to_json()[:-1] + b',"future":1}'
    assert Process.from_json(raw) == p


def test_status_text():
    t = init_record().status_text()
    assert t.splitlines()[:4] == ["pid 1", "ppid 0", "name init", "state running"]
    assert "image -\n" in t and "error" not in t
    e = Process(pid=3, ppid=1, name="x", state="error", error="no host").status_text()
    assert e.endswith("error no host\n")


def test_wait_line():
    assert WaitRecord(8, "web", "killed", "killed").line() == "8 web killed killed\n"
    assert WaitRecord(8, "web", "exited", "multi\nline").line() == "8 web exited multi line\n"
    assert WaitRecord(8, "web", "exited").line() == "8 web exited\n"
