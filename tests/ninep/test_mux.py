"""AnameMux picks the tree by aname."""

from __future__ import annotations

import errno

import pytest

from ninep.ctlfs import CtlFS
from ninep.errors import FsError
from ninep.localfs import LocalFS
from ninep.mux import AnameMux


async def test_mux_routes_by_aname(tmp_path):
    (tmp_path / "f").write_text("x")
    local, ctl = LocalFS(tmp_path), CtlFS()
    mux = AnameMux(local, {"ctl": ctl})
    try:
        assert (await mux.attach("u", "ctl")) is ctl.root
        r = await mux.attach("u", "")
        assert (await r.walk("f")).qid().path == (tmp_path / "f").stat().st_ino
        await mux.attach("u", str(tmp_path))
        with pytest.raises(FsError) as ei:
            await mux.attach("u", "other")
        assert ei.value.errno == errno.ENOENT
    finally:
        await mux.close()
    assert local._root_fd is None
