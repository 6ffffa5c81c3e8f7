"""cloudfs.tree: the table is well formed and docs/namespace.md is in step."""

import pathlib
import stat

from cloudfs import tree

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "namespace.md"


def test_kinds_unique_and_modes_typed():
    assert len({e.kind for e in tree.TREE}) == len(tree.TREE)
    for e in tree.TREE:
        assert stat.S_ISDIR(e.mode) or stat.S_ISREG(e.mode)
        assert tree.qid_of(e.kind).is_dir == stat.S_ISDIR(e.mode)


def test_qid_paths_distinct():
    q = {tree.qid_of(k, p, key).path for k in (tree.ENVKEY, tree.STATUS) for p in (1, 2, 70000)
         for key in ("", "a", "b")}
    assert len(q) == 18


def test_doc_mentions_every_path_and_mode():
    text = DOC.read_text()
    for e in tree.TREE:
        assert f"`{e.pattern}`" in text, e.pattern
        assert oct(stat.S_IMODE(e.mode))[2:].rjust(4, "0") in text, e.pattern
