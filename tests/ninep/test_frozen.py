"""ninep.frozen: a frozen slotted dataclass with a faster __init__, same behaviour."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from ninep import messages as m
from ninep.fs import Attr
from ninep.frozen import frozen
from ninep.qid import Qid


@frozen
class Point:
    x: int
    y: int = 7
    label: str = "p"


@frozen
class Listed:
    items: list = dataclasses.field(default_factory=list)


@frozen
class Checked:
    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError("negative")


def test_positional_keyword_and_defaults():
    assert Point(1) == Point(x=1) == Point(1, 7, "p")
    assert Point(1, label="q") == Point(x=1, y=7, label="q")
    assert (Point(2, 3).x, Point(2, 3).y, Point(2, 3).label) == (2, 3, "p")


@pytest.mark.parametrize("call", [
    lambda: Point(),                 # missing x
    lambda: Point(1, 2, "a", 4),     # too many
    lambda: Point(1, z=3),           # unknown keyword
    lambda: Point(1, x=2),           # x twice
])
def test_bad_arguments_are_typeerror(call):
    with pytest.raises(TypeError):
        call()


def test_still_frozen_slotted_hashable_and_replaceable():
    p = Point(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.x = 2  # type: ignore[misc]
    assert not hasattr(p, "__dict__")
    assert hash(p) == hash(Point(1))
    assert dataclasses.replace(p, y=9) == Point(1, 9)
    assert repr(p) == "Point(x=1, y=7, label='p')"
    assert Point.__match_args__ == ("x", "y", "label")
    assert list(inspect.signature(Point).parameters) == ["x", "y", "label"]


def test_classes_it_cannot_speed_up_keep_the_dataclass_init():
    assert Listed().items == [] and Listed().items is not Listed().items
    with pytest.raises(ValueError):
        Checked(-1)
    assert Checked(1).n == 1


def test_messages_qids_and_attrs_use_it():
    q = Qid(0x80, 1, 2)
    assert (q.type, q.version, q.path) == (0x80, 1, 2)
    r = m.Rgetattr(1, m.P9_GETATTR_BASIC, q, 0o644, 0, 0, 1, 0, 5, 4096, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert r == m.Rgetattr(tag=1, valid=m.P9_GETATTR_BASIC, qid=q, mode=0o644, uid=0, gid=0, nlink=1, rdev=0,
                           size=5, blksize=4096, blocks=1, atime_sec=0, atime_nsec=0, mtime_sec=0,
                           mtime_nsec=0, ctime_sec=0, ctime_nsec=0, btime_sec=0, btime_nsec=0, gen=0,
                           data_version=0)
    assert m.Rerror(tag=1, ename="x").errno == 0  # a default
    assert Attr(qid=q, mode=0o644).blksize == 4096
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.size = 1  # type: ignore[misc]


def test_an_init_of_its_own_is_kept_and_annotations_are_those_of_dataclass():
    @frozen
    class Own:
        a: int

        def __init__(self, a: int, scale: int) -> None:
            object.__setattr__(self, "a", a * scale)

    assert Own(2, 3).a == 6
    assert Point.__init__.__annotations__ == {"x": "int", "y": "int", "label": "str", "return": None}
