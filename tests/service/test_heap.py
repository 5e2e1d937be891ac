"""A serving process's start-up heap is frozen out of the garbage collector's way; an app built
in a test (several per process) freezes nothing."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from service.api import build_app
from tests.service.helpers import settings_for


def scanned(obj: object) -> bool:
    """Whether the collector's generations hold ``obj`` (frozen objects are in none)."""
    return any(o is obj for o in gc.get_objects())


@pytest.mark.parametrize("own_process", [True, False])
async def test_a_served_apps_start_up_heap_is_frozen_only_in_its_own_process(
    tiny_model_dir: Path, own_process: bool
) -> None:
    before = [object()]  # alive since before start-up
    app = build_app(settings_for("memory", tiny_model_dir, None), own_process=own_process)
    try:
        async with app.router.lifespan_context(app):
            frozen = gc.get_freeze_count()
            seen = scanned(before), scanned(app.state.service)
            after = [object()]  # allocated by a request, say
            seen_after = scanned(after)
    finally:
        gc.unfreeze()
    assert seen_after
    if own_process:
        assert frozen > 0 and seen == (False, False)
    else:
        assert frozen == 0 and seen == (True, True)
