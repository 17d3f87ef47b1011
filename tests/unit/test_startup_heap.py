"""A process's start-up objects leave the collector's walks once it serves."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from workers.startup_heap import freeze_startup_heap


class _Resource:
    """Stands for a pool or a client: an object the collector tracks."""


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    gc.disable()  # no automatic collection may stand in for the one under test
    yield
    gc.enable()
    gc.unfreeze()  # the rest of the test session collects as before


def _walked(obj: object) -> bool:
    """Whether a collection of the oldest generation would traverse ``obj``."""
    return any(o is obj for o in gc.get_objects())


@pytest.mark.usefixtures("unfrozen")
def test_objects_alive_at_the_freeze_are_no_longer_walked_and_later_ones_are() -> None:
    started = _Resource()
    assert _walked(started)

    freeze_startup_heap()

    later = _Resource()
    assert not _walked(started)
    assert _walked(later)


@pytest.mark.usefixtures("unfrozen")
def test_start_up_garbage_is_freed_not_frozen() -> None:
    cycle = _Resource()
    cycle.me = cycle  # type: ignore[attr-defined]
    gone = weakref.ref(cycle)
    del cycle
    assert gone() is not None  # only a collection frees a cycle

    freeze_startup_heap()

    assert gone() is None
