"""cloudfs.decisions: the reconciler's decision table, row by row, with no
ZooKeeper, QEMU or OpenStack.  Every state × desired state × observed
server state has an expected answer here, and :func:`decide` is checked to
be total and to need no more than :func:`look` asks for."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from cloudfs import decisions as d
from cloudfs.decisions import Create, Disown, End, Migrate, Note, Power, Rebuild
from cloudfs.drivers.base import Server
from cloudfs.process import Desired, Process, State

SCOPE = "fake"
VM = "vm-1"
OBSERVED = ("gone", "foreign", "exited", "killed", "error", "creating", "unknown", "running", "stopped")


def proc(state: State = State.RUNNING, desired: Desired = Desired.RUNNING, *, vm: str | None = VM,
         image: str | None = "tiny", built: bool = True, scope: str = SCOPE) -> Process:
    return Process(pid=7, ppid=1, name="p7", state=state, desired=desired, image=image, vm=vm,
                   gen=2, built_gen=2 if built else 1, scope=scope if vm else "")


def seen(observed: str, kids: bool = False) -> d.Seen:
    if observed == "gone":
        return d.Seen(kids=kids, gone=True)
    if observed == "foreign":
        return d.Seen(kids=kids, foreign=True)
    return d.Seen(kids=kids, server=Server(VM, "p7", observed, "h", (), f"{observed} says why"))


def expected(code: str):
    """The grid's codes: ``-`` nothing; ``vanished``/``exited``/``deleted``
    an End; ``err`` Note(error); ``note:S``; ``accept:S`` (state and
    desired); ``power:S``."""
    if code == "-":
        return None
    if code == "vanished":
        return End(State.EXITED, "server vanished", (), reparent=True)
    if code == "exited":
        return End(State.EXITED, "exited says why", (VM,), reparent=True)
    if code == "deleted":
        return End(State.EXITED, "killed says why", (), reparent=True)
    if code == "err":
        return Note(State.ERROR, error="error says why")
    if code == "theirs":
        return Note(State.ERROR, error=f"server {VM} belongs to another deployment")
    verb, s = code.split(":")
    s = State(s)
    return {"note": Note(s), "accept": Note(s, desired=Desired(s.value)), "power": Power(VM, s)}[verb]


# A settled VM (image, server, built from the latest exec, this scope):
# what each recorded state and desired state does with each observation.
#                        gone      foreign exited  killed   error  creating unknown running         stopped
GRID = """
running  running         vanished  theirs  exited  deleted  err    -        -       -               accept:stopped
stopped  running         vanished  theirs  exited  deleted  err    -        -       note:running    power:running
creating running         vanished  theirs  exited  deleted  err    -        -       note:running    power:running
new      running         vanished  theirs  exited  deleted  err    -        -       note:running    power:running
running  stopped         vanished  theirs  exited  deleted  err    -        -       power:stopped   note:stopped
stopped  stopped         vanished  theirs  exited  deleted  err    -        -       accept:running  -
creating stopped         vanished  theirs  exited  deleted  err    -        -       power:stopped   note:stopped
new      stopped         vanished  theirs  exited  deleted  err    -        -       power:stopped   note:stopped
migrating running        vanished  theirs  exited  deleted  err    -        -       note:running    power:running
migrating stopped        vanished  theirs  exited  deleted  err    -        -       power:stopped   note:stopped
"""
ROWS = [line.split() for line in GRID.strip().splitlines()]


@pytest.mark.parametrize("state,desired,observed,code", [
    (r[0], r[1], o, c) for r in ROWS for o, c in zip(OBSERVED, r[2:])
])
def test_settled_vm(state, desired, observed, code):
    rec = proc(State(state), Desired(desired))
    assert d.look(rec, SCOPE) == d.Look(status=True)
    assert d.decide(rec, seen(observed), SCOPE) == expected(code)


@pytest.mark.parametrize("observed", OBSERVED)
@pytest.mark.parametrize("desired", [Desired.RUNNING, Desired.STOPPED])
def test_error_is_sticky_until_exec_or_kill(desired, observed):
    rec = proc(State.ERROR, desired)
    assert d.look(rec, SCOPE) == d.NOTHING
    assert d.decide(rec, seen(observed), SCOPE) is None


@pytest.mark.parametrize("observed", OBSERVED)
@pytest.mark.parametrize("state", list(State))
def test_killed_ends_once_the_children_are_gone(state, observed):
    rec = proc(state, Desired.KILLED)
    assert d.look(rec, SCOPE) == d.Look(kids=True)
    assert d.decide(rec, seen(observed, kids=True), SCOPE) is None
    assert d.decide(rec, seen(observed), SCOPE) == End(State.KILLED, "killed", (VM,))


def test_killed_without_a_recorded_server_deletes_the_ones_found():
    rec = proc(State.CREATING, Desired.KILLED, vm=None)
    assert d.look(rec, SCOPE) == d.Look(kids=True, find=True)
    assert d.decide(rec, d.Seen(found=("a", "b")), SCOPE) == End(State.KILLED, "killed", ("a", "b"))
    assert d.decide(rec, d.Seen(), SCOPE) == End(State.KILLED, "killed", ())
    new = proc(State.NEW, Desired.KILLED, vm=None, image=None)
    assert d.look(new, SCOPE) == d.Look(kids=True)
    assert d.decide(new, d.Seen(), SCOPE) == End(State.KILLED, "killed", ())


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("desired", list(Desired))
def test_another_scopes_vm_is_disowned(state, desired):
    rec = proc(state, desired, scope="qemu!other-host!/state")
    assert d.look(rec, SCOPE) == d.NOTHING
    assert d.decide(rec, d.Seen(), SCOPE) == Disown()
    assert d.decide(dataclasses.replace(rec, scope=""), seen("running"), SCOPE) != Disown()  # no scope: any


@pytest.mark.parametrize("state", list(State))
def test_new_and_imageless_processes_wait(state):
    for rec in (proc(state, Desired.NEW), proc(state, Desired.RUNNING, image=None, vm=None)):
        assert d.look(rec, SCOPE) == d.NOTHING
        assert d.decide(rec, d.Seen(), SCOPE) is None


@pytest.mark.parametrize("state", [s for s in State if s is not State.ERROR])
@pytest.mark.parametrize("desired", [Desired.RUNNING, Desired.STOPPED])
def test_no_server_creates(state, desired):
    rec = proc(state, desired, vm=None, built=False)
    assert d.look(rec, SCOPE) == d.NOTHING
    assert d.decide(rec, d.Seen(), SCOPE) == Create()
    assert d.decide(dataclasses.replace(rec, built_gen=rec.gen), d.Seen(), SCOPE) == Create()


def test_a_failed_create_waits_for_the_next_exec():
    failed = proc(State.ERROR, vm=None, built=True)
    assert d.decide(failed, d.Seen(), SCOPE) is None
    assert d.decide(dataclasses.replace(failed, gen=3), d.Seen(), SCOPE) == Create()  # exec again


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("desired", [Desired.RUNNING, Desired.STOPPED])
def test_exec_of_a_vm_rebuilds(state, desired):
    rec = proc(state, desired, built=False)
    assert d.look(rec, SCOPE) == d.NOTHING
    assert d.decide(rec, d.Seen(), SCOPE) == Rebuild(VM)


def _all_records():
    for state, desired, vm, image, built, scope, move_to in itertools.product(
            State, Desired, (None, VM), (None, "tiny"), (True, False), (SCOPE, "", "elsewhere"), ("", "h2")):
        yield dataclasses.replace(proc(state, desired, vm=vm, image=image, built=built, scope=scope), move_to=move_to)


def _all_seen():
    yield d.Seen()
    for observed, kids, found in itertools.product(OBSERVED + ("unknown-word",), (False, True), ((), ("x",))):
        s = seen(observed, kids)
        yield dataclasses.replace(s, found=found)


#: With ``move_to`` set, what each observation does: the server's end or
#: failure first, else the move (whatever its power state).
MOVE_GRID = dict(zip(OBSERVED, "vanished theirs exited deleted err move move move move".split()))


@pytest.mark.parametrize("state", ["running", "stopped", "migrating"])
@pytest.mark.parametrize("desired", ["running", "stopped"])
@pytest.mark.parametrize("observed", OBSERVED)
def test_a_move_asked_for(state, desired, observed):
    rec = dataclasses.replace(proc(State(state), Desired(desired)), move_to="h2")
    code = MOVE_GRID[observed]
    assert d.decide(rec, seen(observed), SCOPE) == (Migrate(VM, "h2") if code == "move" else expected(code))
    killed = dataclasses.replace(rec, desired=Desired.KILLED)
    assert d.decide(killed, seen(observed), SCOPE) == End(State.KILLED, "killed", (VM,))  # a kill wins


def test_move_records():
    rec = dataclasses.replace(proc(State.RUNNING), move_to="h2", host="h1")
    going = d.migrating(rec, VM, "h2")
    assert going.state is State.MIGRATING and going.move_to == "h2"
    for other in (dataclasses.replace(rec, vm="vm-2"), dataclasses.replace(rec, move_to="h3"),
                  dataclasses.replace(rec, desired=Desired.KILLED)):
        with pytest.raises(d.Superseded):
            d.migrating(other, VM, "h2")
    there = Server("vm-9", "p7", "running", "h2", ("10.0.2.15",))
    done = d.moved(going, VM, there, "scope-2", "T")
    assert (done.vm, done.host, done.scope, done.state, done.move_to, done.move) == \
        ("vm-9", "h2", "scope-2", State.RUNNING, "", "from h1 to h2 at T")
    assert "move from h1 to h2 at T" in done.status_text()
    assert d.moved(dataclasses.replace(going, desired=Desired.STOPPED), VM, there, "s", "T").state is State.STOPPED
    with pytest.raises(d.Superseded):
        d.moved(dataclasses.replace(going, desired=Desired.KILLED), VM, there, "s", "T")
    failed = d.move_failed(going, VM, "h2", "no\nroute")
    assert (failed.state, failed.move_to, failed.move, failed.vm) == (State.RUNNING, "", "to h2 failed: no route", VM)
    assert "move to h2 failed: no route" in failed.status_text() and "move to h2\n" in going.status_text()
    newer = d.move_failed(dataclasses.replace(going, move_to="h3"), VM, "h2", "x")
    assert newer.move_to == "h3"  # a newer request stays


def test_decide_is_total_and_needs_only_what_look_asks_for():
    """For every record and every observation: decide answers (never
    raises), and changing a part of the observation that look did not ask
    for never changes the answer."""
    n = 0
    for rec in _all_records():
        want = d.look(rec, SCOPE)
        answers = set()
        for s in _all_seen():
            masked = d.Seen(kids=s.kids if want.kids else False,
                            server=s.server if want.status else None, gone=s.gone if want.status else False,
                            foreign=s.foreign if want.status else False, found=s.found if want.find else ())
            assert d.decide(rec, s, SCOPE) == d.decide(rec, masked, SCOPE), (rec, s)
            answers.add(d.decide(rec, masked, SCOPE))
            n += 1
        if want == d.NOTHING:
            assert len(answers) == 1, (rec, answers)
    assert n > 10_000


# -- writing results back ------------------------------------------------------------------

SERVER = Server(VM, "p7", "running", "host-a", ("10.0.0.5",))


def test_built_records_the_server_and_its_power_state():
    rec = proc(State.CREATING, vm=None, built=False)
    out = d.built(rec, SERVER, rec.gen, "scope-a", creating=True)
    assert (out.vm, out.host, out.addresses, out.scope, out.state, out.built_gen, out.error) == \
        (VM, "host-a", ["10.0.0.5"], "scope-a", State.RUNNING, rec.gen, "")
    stopped = d.built(rec, dataclasses.replace(SERVER, status="stopped"), rec.gen, SCOPE, creating=True)
    assert stopped.state is State.STOPPED  # an adopted server that is off
    assert rec.vm is None  # the input is left alone


def test_a_create_is_superseded_by_another_server_or_a_kill():
    other = proc(State.RUNNING, vm="vm-other")
    with pytest.raises(d.Superseded) as e:
        d.built(other, SERVER, 2, SCOPE, creating=True)
    assert e.value.record is other
    with pytest.raises(d.Superseded):
        d.built(proc(State.CREATING, Desired.KILLED, vm=None), SERVER, 2, SCOPE, creating=True)
    assert d.built(proc(State.CREATING, vm=VM), SERVER, 2, SCOPE, creating=True).vm == VM  # our own: fine
    killed = d.built(proc(State.CREATING, Desired.KILLED, built=False), SERVER, 2, SCOPE, creating=False)
    assert killed.state is State.CREATING and killed.built_gen == 2  # a rebuild is recorded; the kill follows


def test_build_failures():
    rec = proc(State.CREATING, vm=None, built=False)
    out = d.build_failed(rec, "no valid host", rec.gen, creating=True)
    assert (out.state, out.error, out.built_gen) == (State.ERROR, "no valid host", rec.gen)
    with pytest.raises(d.Superseded):
        d.build_failed(proc(State.RUNNING, vm="vm-other"), "late failure", 2, creating=True)
    assert d.build_failed(proc(State.CREATING, built=False), "bad image", 2, creating=False).state is State.ERROR


def test_power_results():
    assert d.powered(proc(State.RUNNING, Desired.STOPPED), "stopped").state is State.STOPPED
    assert d.powered(proc(State.STOPPED), "running").state is State.RUNNING
    assert d.powered(proc(State.ERROR), "running").state is State.ERROR  # not ours to clear
    assert d.powered(proc(State.RUNNING), "creating").state is State.RUNNING
    failed = d.power_failed(proc(State.RUNNING, Desired.STOPPED), "hypervisor busy")
    assert (failed.state, failed.error) == (State.ERROR, "hypervisor busy")


def test_noted():
    rec = proc(State.RUNNING)
    assert d.noted(rec, Note(State.STOPPED, Desired.STOPPED)).desired is Desired.STOPPED
    e = d.noted(rec, Note(State.ERROR, error="disk full"))
    assert (e.state, e.error, e.desired) == (State.ERROR, "disk full", Desired.RUNNING)
