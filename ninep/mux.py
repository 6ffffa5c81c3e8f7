"""Several served trees behind one server, chosen by the attach name.

diod serves its exported directories and the synthetic ``ctl`` tree from one
listener; the aname of Tattach (attach(5), 9P2000.L Tattach) picks which.
:class:`AnameMux` does the same for any :class:`~ninep.fs.FileSystem`.
"""

from __future__ import annotations

from collections.abc import Mapping

from .fs import FileSystem, Node

__all__ = ["AnameMux"]


class AnameMux(FileSystem):
    """A FileSystem that hands ``attach`` to ``named[aname]`` when the aname is
    one of its keys (exact match), else to ``default``.

    Errors are those of the chosen tree (e.g. FsError(ENOENT) for an aname
    ``default`` does not serve).  ``close`` closes every distinct tree once.
    """

    def __init__(self, default: FileSystem, named: Mapping[str, FileSystem]):
        self.default = default
        self.named = dict(named)

    def tree_for(self, aname: str) -> FileSystem:
        """The tree that serves ``aname``."""
        return self.named.get(aname, self.default)

    async def attach(self, uname: str, aname: str, n_uname: int | None = None) -> Node:
        return await self.tree_for(aname).attach(uname, aname, n_uname)

    async def close(self) -> None:
        seen: list[FileSystem] = []
        for fs in [self.default, *self.named.values()]:
            if not any(fs is s for s in seen):
                seen.append(fs)
                await fs.close()
