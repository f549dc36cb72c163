"""Break round 5 (unit): the server check's judgement of a server coming back into the rotation."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from wiki_embeddings.core.backfill.halt import Halt
from wiki_embeddings.core.backfill.servercheck import ServerCheck

pytestmark = pytest.mark.unit


def check() -> ServerCheck:
    client: Any = SimpleNamespace(
        model="m", text_prefix="", server_states=lambda: [{"url": "http://a"}, {"url": "http://b"}]
    )
    store: Any = SimpleNamespace(table=SimpleNamespace(qualified="s.t", embedding_column="embedding"))
    return ServerCheck(store, client, SimpleNamespace(), Halt())  # type: ignore[arg-type]


def test_a_fresh_column_none_of_whose_servers_answered_at_the_start_is_set_by_the_first_back_and_judges_the_next():
    """Every server failed the probe text at the start (weather): the first to come back sets the column's model
    for the run, and a second serving other weights under the name stays out (it was let in unchecked before)."""
    servers = check()
    rng = np.random.default_rng(1)
    mine, other = rng.normal(size=8), rng.normal(size=8)
    assert servers.admit(0, mine) is None
    assert servers.admit(0, mine + 1e-4) is None
    assert servers.admit(1, other) is not None
    assert servers.halt.halted
