"""The reconciler's decision table: what to do about one process, given its
record and what the compute driver reports.  Pure functions, no I/O: the
executor (cloudfs.reconciler) looks, asks :func:`decide`, carries out the
one action it gets, and asks again, until the answer is "nothing".

The whole table, in the order :func:`decide` applies it (``D`` desired,
``S`` state, ``O`` what the driver reports for the record's server)::

    the server is another driver scope's (a VM of another host)  Disown
    D killed, children left                                      -  (the last child's end queues us again)
    D killed, no children                                        End(killed, delete its server, or the ones
                                                                     tagged with the pid if none is recorded)
    no image, or D new                                           -
    no server, S error, built from the latest exec               -  (a failed create: exec again to retry)
    no server                                                    Create (find-or-create by deployment + pid)
    gen ≠ built_gen                                              Rebuild
    S error                                                      -  (sticky: exec or kill)
    O: another deployment's server (a corrupt record)            Note(S error)
    O: no such server                                            End(exited "server vanished", reparent)
    O exited                                                     End(exited <its message>, delete, reparent)
    O killed (deleted outside cloudfs)                           End(exited "server deleted", reparent)
    O error                                                      Note(S error, <its message>)
    O creating (still building), or unknown                      -  (look again later)
    O = D,  S = O                                                -
    O = D,  S ≠ O                                                Note(S = O)
    O ≠ D,  S = D   (power changed outside cloudfs)              Note(S = D = O): accepted, as Nova's
                                                                     power-state sync does
    O ≠ D,  S ≠ D   (ctl asked for a change)                     Power(D)  (stop / start)

What the executor must look at first is :func:`look` (children when D is
killed; the driver's status of a settled VM; the servers tagged with the pid
when a killed process names none).  How an action's result is written back
is here too (:func:`built`, :func:`build_failed`, :func:`powered`,
:func:`power_failed`, :func:`noted`): each takes the record as it is *now*
(it may have changed while the driver worked) and returns the record to
write, or raises :class:`Superseded` when another daemon's server was
recorded meanwhile or the process was killed while its server booted.

``tests/cloudfs/test_decisions.py`` runs the table over every state ×
desired state × observed server state, without ZooKeeper or a cloud.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .drivers.base import Server
from .process import Desired, Process, State

#: Driver statuses that are power states (cloudfs.drivers.base.Server.status).
_POWER = {"running": State.RUNNING, "stopped": State.STOPPED}


def reaches(rec: Process, scope: str) -> bool:
    """Whether a driver of ``scope`` can act on ``rec``'s server: it has none
    yet (and is not a ``fork live`` child, whose snapshot only its parent's
    scope holds), or it was made by a driver of the same scope (or before
    scopes were recorded)."""
    return (rec.vm is None and not rec.snapshot) or rec.scope in ("", scope)


# -- what to look at ------------------------------------------------------------


@dataclass(frozen=True)
class Look:
    """What the executor reads before deciding: ``kids`` (whether the
    process has children), ``status`` (the driver's status of ``rec.vm``),
    ``find`` (the driver's servers tagged with the pid)."""

    kids: bool = False
    status: bool = False
    find: bool = False


NOTHING = Look()


def look(rec: Process, scope: str) -> Look:
    """What :func:`decide` needs to know about ``rec`` beyond the record."""
    if not reaches(rec, scope):
        return NOTHING
    if rec.desired is Desired.KILLED:
        return Look(kids=True, find=rec.vm is None and rec.has_image)
    if not rec.has_image or rec.desired is Desired.NEW or rec.vm is None or not rec.built:
        return NOTHING
    if rec.state is State.ERROR:
        return NOTHING
    return Look(status=True)


@dataclass(frozen=True)
class Seen:
    """What the executor saw (as asked by :func:`look`): ``kids``;
    ``server`` the status of ``rec.vm`` (None: not asked, or ``gone``);
    ``gone`` the driver has no such server; ``foreign`` it is another
    deployment's (NotOurs); ``found`` the ids of servers tagged with the
    pid."""

    kids: bool = False
    server: Server | None = None
    gone: bool = False
    foreign: bool = False
    found: tuple[str, ...] = ()


# -- actions ----------------------------------------------------------------------


@dataclass(frozen=True)
class Disown:
    """Give the pid up: its server is another driver scope's."""


@dataclass(frozen=True)
class End:
    """Delete ``delete`` (server ids; a failure is noted in the message of a
    kill), then remove the process: final ``state``, ``message`` for the
    parent's wait record, children to init when ``reparent``."""

    state: State
    message: str
    delete: tuple[str, ...] = ()
    reparent: bool = False


@dataclass(frozen=True)
class Create:
    """Find or create the process's server (ComputeDriver.create)."""


@dataclass(frozen=True)
class Rebuild:
    """Rebuild server ``vm`` from the record's image and user-data."""

    vm: str


@dataclass(frozen=True)
class Power:
    """Stop (``to`` STOPPED) or start (``to`` RUNNING) server ``vm``."""

    vm: str
    to: State


@dataclass(frozen=True)
class Note:
    """Write what was observed: ``state`` (and ``desired``, when a change made
    outside cloudfs is accepted), ``error`` for state error."""

    state: State
    desired: Desired | None = None
    error: str = ""


@dataclass(frozen=True)
class Migrate:
    """Move server ``vm`` to host ``host`` (``migrate HOST``; the record's
    ``move_to``)."""

    vm: str
    host: str


Action = Disown | End | Create | Rebuild | Power | Note | Migrate


def decide(rec: Process, seen: Seen, scope: str) -> Action | None:
    """The one next step for ``rec`` (the table in the module docstring), or
    None when there is nothing to do now.  ``scope`` is this daemon's driver
    scope."""
    if not reaches(rec, scope):
        return Disown()
    if rec.desired is Desired.KILLED:
        if seen.kids:
            return None
        return End(State.KILLED, "killed", (rec.vm,) if rec.vm else seen.found if rec.has_image else ())
    if not rec.has_image or rec.desired is Desired.NEW:
        return None
    if rec.vm is None:
        if rec.state is State.ERROR and rec.built:
            return None
        return Create()
    if not rec.built:
        return Rebuild(rec.vm)
    if rec.state is State.ERROR:
        return None
    if seen.foreign:
        return Note(State.ERROR, error=f"server {rec.vm} belongs to another deployment")
    if seen.gone:
        return End(State.EXITED, "server vanished", reparent=True)
    server = seen.server
    if server is None:
        return None
    if server.status == "exited":
        return End(State.EXITED, server.message or "exited", (rec.vm,), reparent=True)
    if server.status == "killed":
        return End(State.EXITED, server.message or "server deleted", reparent=True)
    if server.status == "error":
        return Note(State.ERROR, error=server.message or "the backend reports an error")
    if rec.move_to:
        return Migrate(rec.vm, rec.move_to)
    observed = _POWER.get(server.status)
    if observed is None:
        return None
    want = State(rec.desired.value)
    if observed is want:
        return None if rec.state is observed else Note(observed)
    if rec.state is want:
        return Note(observed, desired=Desired(observed.value))
    return Power(rec.vm, want)


# -- writing results back -------------------------------------------------------------


class Superseded(Exception):
    """A create's result must not be recorded: ``record`` (as it is now)
    names another server, or the process is being killed."""

    def __init__(self, record: Process):
        super().__init__(record.vm)
        self.record = record


def built(now: Process, server: Server, gen: int, scope: str, creating: bool, secret: str = "") -> Process:
    """``now`` with ``server`` recorded as built from exec ``gen`` by a
    driver of ``scope`` (and, for a rebuild, the guest's new ``secret``).  Superseded for a create when ``now`` names another
    server (another daemon's create won) or is being killed (a kill came
    while it booted; the kill may not have seen this server)."""
    if creating and ((now.vm is not None and now.vm != server.id) or now.desired is Desired.KILLED):
        raise Superseded(now)
    rec = dataclasses.replace(now, vm=server.id, host=server.host, addresses=list(server.addresses), scope=scope,
                              built_gen=max(now.built_gen, gen), error="", secret=secret or now.secret,
                              snapshot="")
    if now.desired is not Desired.KILLED:
        rec.state = _POWER.get(server.status, State.RUNNING)
    return rec


def migrating(now: Process, vm: str, host: str) -> Process:
    """``now`` (still on ``vm``, still asked to go to ``host``) in state
    migrating; Superseded if it names another server or another move now,
    or is being killed."""
    if now.vm != vm or now.move_to != host or now.desired is Desired.KILLED:
        raise Superseded(now)
    return dataclasses.replace(now, state=State.MIGRATING)


def moved(now: Process, vm: str, server: Server, scope: str, at: str) -> Process:
    """``now`` after its VM ``vm`` moved: ``server`` (on its new host, made
    by a driver of ``scope``) is its VM; the move is done.  Superseded if
    ``now`` names another server or is being killed (the move is then
    undone)."""
    if now.vm != vm or now.desired is Desired.KILLED:
        raise Superseded(now)
    state = State.STOPPED if now.desired is Desired.STOPPED else State.RUNNING
    return dataclasses.replace(now, vm=server.id, host=server.host, addresses=list(server.addresses) or now.addresses,
                               scope=scope, state=state, move_to="", move=f"from {now.host} to {server.host} at {at}")


def move_failed(now: Process, vm: str, host: str, message: str) -> Process:
    """``now`` after a move of ``vm`` to ``host`` failed: it stays where it
    was (state as desired), the move is given up and says why."""
    if now.vm != vm:
        raise Superseded(now)
    state = State.STOPPED if now.desired is Desired.STOPPED else State.RUNNING
    if now.state not in (State.MIGRATING, State.RUNNING, State.STOPPED):
        state = now.state
    return dataclasses.replace(now, state=state, move_to="" if now.move_to == host else now.move_to,
                               move=f"to {host} failed: {' '.join(message.split())}")


def build_failed(now: Process, message: str, gen: int, creating: bool) -> Process:
    """``now`` in state error with ``message`` (exec ``gen`` counts as
    built, so it is not retried until the next exec).  Superseded for a
    create when ``now`` names a server meanwhile (its record stands)."""
    if creating and now.vm is not None:
        raise Superseded(now)
    return dataclasses.replace(now, state=State.ERROR, error=message, built_gen=max(now.built_gen, gen))


def powered(now: Process, status: str) -> Process:
    """``now`` after a stop or start whose server reports ``status``
    (unchanged unless both are power states)."""
    observed = _POWER.get(status)
    if observed is None or now.state not in (State.RUNNING, State.STOPPED):
        return now
    return dataclasses.replace(now, state=observed)


def power_failed(now: Process, message: str) -> Process:
    """``now`` in state error with the driver's ``message``."""
    return dataclasses.replace(now, state=State.ERROR, error=message)


def noted(rec: Process, note: Note) -> Process:
    """``rec`` (the version :func:`decide` saw) with ``note`` written."""
    out = dataclasses.replace(rec, state=note.state, error=note.error if note.state is State.ERROR else rec.error)
    if note.desired is not None:
        out.desired = note.desired
    return out
