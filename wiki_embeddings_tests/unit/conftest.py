"""The unit tier: every test here is marked `unit` and runs against the fakes of fakes.py (no PostgreSQL, no
HTTP server, no subprocess), so `pytest -m unit` answers in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.unit)
