"""cloudfs.ctl: parsing of ctl commands (pure)."""

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudfs.ctl import VERBS, Command, parse
from ninep.errors import FsError


@pytest.mark.parametrize(
    "text, want",
    [
        ("fork", Command("fork")),
        ("fork\n", Command("fork")),
        ("fork name=web", Command("fork", name="web")),
        ("fork live", Command("fork", live=True)),
        ("fork live name=w", Command("fork", name="w", live=True)),
        ("migrate d2", Command("migrate", host="d2")),
        ("migrate cloudfs-compute2\n", Command("migrate", host="cloudfs-compute2")),
        ("fork name=w live", Command("fork", name="w", live=True)),
        ("exec tiny", Command("exec", image="tiny")),
        ("exec tiny flavor=m1.small net=user name=db\n",
         Command("exec", image="tiny", flavor="m1.small", networks=("user",), name="db")),
        ("exec alpine net=a,b", Command("exec", image="alpine", networks=("a", "b"))),
        ("  kill  ", Command("kill")),
        ("stop\r\n", Command("stop")),
        ("start", Command("start")),
    ],
)
def test_parses(text, want):
    assert parse(text.encode()) == want


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty ctl command"),
        ("\n", "empty ctl command"),
        ("frok", "unknown ctl command 'frok'"),
        ("fork\nkill", "one command per write"),
        ("exec", "exec needs an image"),
        ("exec tiny alpine", "one image"),
        ("exec tiny color=red", "unknown option 'color'"),
        ("exec tiny flavor=a flavor=b", "given twice"),
        ("exec tiny flavor=", "needs a value"),
        ("fork 7", "unexpected argument '7'"),
        ("fork live live", "unexpected argument 'live live'"),
        ("migrate", "takes one host"),
        ("migrate a b", "takes one host"),
        ("migrate a/b", "bad host name"),
        ("migrate to=b", "takes no options"),
        ("fork dead", "unexpected argument 'dead'"),
        ("fork live name=a/b", "bad name"),
        ("kill now", "kill takes no arguments"),
        ("stop force=1", "stop takes no arguments"),
        ("fork name=bad/name", "bad name"),
        ("exec ../etc", "bad image"),
        ("exec tiny net=a,,b", "bad network name"),
    ],
)
def test_errors_say_what_is_wrong(text, fragment):
    with pytest.raises(FsError) as e:
        parse(text.encode())
    assert e.value.errno == errno.EINVAL
    assert fragment in e.value.message


def test_not_utf8():
    with pytest.raises(FsError) as e:
        parse(b"exec \xff")
    assert e.value.errno == errno.EINVAL and "UTF-8" in e.value.message


@given(st.binary(max_size=64))
def test_any_bytes_parse_or_einval(data):
    try:
        cmd = parse(data)
    except FsError as e:
        assert e.errno == errno.EINVAL and e.message
    else:
        assert cmd.verb in VERBS
