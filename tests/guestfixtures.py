"""pytest fixtures for QEMU guest tests: the cached "tiny" image and a guest factory.

- ``tiny_image`` (session scope): :func:`cloudfs.guestimage.build_tiny` into
  ``<repo>/.cache/guest`` (ignored by git), built once and reused across runs;
  a cold build downloads two Debian packages (about 72 MB) with apt.
- ``guest_factory`` (function scope): ``guest_factory(forwards={564: port}, ...)``
  boots a :class:`tests.guest.Guest` (keyword arguments as for Guest) with its
  console log in the test's tmp dir; every guest it made is killed when the
  test ends, pass or fail.

For one boot per test module, write a module-scoped fixture with
``tests.guest.booted_guest(tiny_image, tmp_path_factory.mktemp(...) / "console.log")``.
Import into a ``conftest.py``: ``from tests.guestfixtures import tiny_image, guest_factory``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudfs.guestimage import TinyImage, build_tiny
from tests.guest import Guest

#: Where the image is cached: <repo>/.cache/guest.
CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache" / "guest"


@pytest.fixture(scope="session")
def tiny_image() -> TinyImage:
    """The "tiny" guest image (kernel + initramfs paths), built or taken from the cache."""
    return build_tiny(CACHE_DIR, progress=lambda line: print(line, flush=True))


@pytest.fixture
def guest_factory(tiny_image, tmp_path):
    """A function booting guests of ``tiny_image``; all are killed at test end.

    ``guest_factory(**kwargs) -> Guest`` (booted); kwargs as for
    :class:`tests.guest.Guest` except ``console_log``, which is
    ``tmp_path/guest<N>.console.log``.
    """
    guests: list[Guest] = []

    def make(**kwargs) -> Guest:
        g = Guest(tiny_image, tmp_path / f"guest{len(guests)}.console.log", **kwargs)
        guests.append(g)
        return g.boot()

    try:
        yield make
    finally:
        for g in guests:
            g.close()
