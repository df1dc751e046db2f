"""Shared fixtures: real engines (engine_fixtures), a real gpud daemon (gpudproc, box)."""

from __future__ import annotations

import pytest

pytest_plugins = ["engine_fixtures", "box_fixture"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Pure, fast tests first: a mistake in the core fails in seconds, not after engines start.
    slow = ("engine", "browser", "systemd", "gpu")

    def rank(item: pytest.Item) -> int:
        return 1 if any(item.get_closest_marker(m) for m in slow) else 0

    items.sort(key=rank)
