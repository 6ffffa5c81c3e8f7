"""Parsing of ``/proc/<pid>/ctl`` commands (pure: no I/O).

One command per write(2), ``verb args…`` (a trailing newline is allowed)::

    fork [live] [name=N]
    exec <image> [flavor=F] [net=NET[,NET…]] [name=N]
    kill
    stop
    start
    migrate <host>

Errors: FsError(EINVAL) whose message says what was wrong (empty command,
several lines, unknown verb, missing image, unknown or repeated option,
bad name).  Whether the image, flavor or network exists is checked later,
against the compute driver.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field

from ninep.errors import FsError

VERBS = ("fork", "exec", "kill", "stop", "start", "migrate")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_OPTIONS = {"fork": ("name",), "exec": ("flavor", "net", "name")}
USAGE = {
    "fork": "fork [live] [name=N]",
    "exec": "exec <image> [flavor=F] [net=NET] [name=N]",
    "kill": "kill",
    "stop": "stop",
    "start": "start",
    "migrate": "migrate <host>",
}


@dataclass(frozen=True)
class Command:
    """A parsed ctl command.  ``networks`` is empty when not given;
    ``live`` is ``fork live`` (the child starts as a copy of the running
    parent's memory and disks); ``host`` the host of ``migrate``."""

    verb: str
    image: str | None = None
    flavor: str | None = None
    networks: tuple[str, ...] = field(default=())
    name: str | None = None
    live: bool = False
    host: str | None = None


def _bad(msg: str) -> FsError:
    return FsError(errno.EINVAL, msg)


def valid_name(s: str) -> bool:
    """Names (process, image, flavor, network): 1–63 of ``[A-Za-z0-9._-]``,
    starting with a letter or digit."""
    return _NAME.fullmatch(s) is not None


def parse(data: bytes | str) -> Command:
    """Parse one ctl write.  Raises FsError(EINVAL) with a precise message."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad("ctl command is not UTF-8 text") from None
    text = data.strip("\n")
    if text.endswith("\r"):
        text = text[:-1]
    if "\n" in text:
        raise _bad("one command per write: got several lines")
    words = text.split()
    if not words:
        raise _bad("empty ctl command; expected one of " + ", ".join(VERBS))
    verb, args = words[0], words[1:]
    if verb not in VERBS:
        raise _bad(f"unknown ctl command {verb!r}; expected one of {', '.join(VERBS)}")
    allowed = _OPTIONS.get(verb, ())
    positional: list[str] = []
    opts: dict[str, str] = {}
    for a in args:
        if "=" in a:
            k, v = a.split("=", 1)
            if k not in allowed:
                if allowed:
                    raise _bad(f"{verb}: unknown option {k!r}; usage: {USAGE[verb]}")
                if verb == "migrate":
                    raise _bad(f"migrate takes no options; usage: {USAGE[verb]}")
                raise _bad(f"{verb} takes no arguments; usage: {USAGE[verb]}")
            if k in opts:
                raise _bad(f"{verb}: option {k}= given twice")
            if not v:
                raise _bad(f"{verb}: option {k}= needs a value")
            opts[k] = v
        else:
            positional.append(a)
    if verb == "exec":
        if not positional:
            raise _bad(f"exec needs an image; usage: {USAGE['exec']}")
        if len(positional) > 1:
            raise _bad(f"exec takes one image, got {len(positional)}: {' '.join(positional)}")
    elif verb == "migrate":
        if len(positional) != 1:
            raise _bad(f"migrate takes one host; usage: {USAGE['migrate']}")
        if not valid_name(positional[0]):
            raise _bad(f"migrate: bad host name {positional[0]!r} (letters, digits, '.', '_', '-')")
        return Command(verb="migrate", host=positional[0])
    elif verb == "fork" and positional:
        if positional != ["live"]:
            raise _bad(f"fork: unexpected argument {' '.join(positional)!r}; usage: {USAGE['fork']}")
        return _checked(verb, Command(verb="fork", name=opts.get("name"), live=True))
    elif positional:
        if allowed:
            raise _bad(f"{verb}: unexpected argument {positional[0]!r}; usage: {USAGE[verb]}")
        raise _bad(f"{verb} takes no arguments; usage: {USAGE[verb]}")
    image = positional[0] if positional else None
    return _checked(verb, Command(verb=verb, image=image, flavor=opts.get("flavor"),
                                  networks=tuple(opts["net"].split(",")) if "net" in opts else (),
                                  name=opts.get("name")))


def _checked(verb: str, cmd: Command) -> Command:
    """``cmd`` once its image, flavor, name and network names are valid."""
    for label, value in (("image", cmd.image), ("flavor", cmd.flavor), ("name", cmd.name)):
        if value is not None and not valid_name(value):
            raise _bad(f"{verb}: bad {label} {value!r} (letters, digits, '.', '_', '-')")
    for n in cmd.networks:
        if not valid_name(n):
            raise _bad(f"{verb}: bad network name {n!r}")
    return cmd
