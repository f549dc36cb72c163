"""Each Dagster run that embeds takes its own share of the model servers (core/spread.py).

Runs at once = the limit of pool `ollama` (`dagster instance concurrency set ollama N`, dagster.yaml's
`default_limit`), read from the instance when the run starts; with S servers in `OLLAMA_URL` a run takes S // N of
them (at least one) by leasing them in the chunk database, and tags itself `wiki_embeddings/server=<indexes>` so
the UI shows which. Why inside the run and not at launch: a multi-run backfill gives all its runs the same tags
(the backfill's own plus the partition range), so no launch-time tag can tell two of its runs apart; and a lease
held by the run's database session is freed by whatever ends the run, `kill -9` included. Answering servers are
leased first, and a lease session that ends is re-taken (core/spread.py); a run bound to servers that all died ends
`server_unavailable`, and the RetryPolicy's retry leases afresh.
"""

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import dagster as dg

from wiki_embeddings.core import spread
from wiki_embeddings.core.factories import resolve_model
from wiki_embeddings.defs.config import OLLAMA_POOL
from wiki_embeddings.defs.resources import OllamaResource, WikiDatabaseResource, run_settings

#: Run tag naming the servers (indexes into OLLAMA_URL) a run leased; absent when it used them all.
SERVER_TAG = "wiki_embeddings/server"


def runs_at_once(instance: dg.DagsterInstance) -> int | None:
    """The pool `ollama`'s limit (the instance default when none was set); None when the storage cannot say."""
    try:
        return instance.event_log_storage.get_concurrency_info(OLLAMA_POOL).limit
    except NotImplementedError:  # an in-memory instance has no pools
        return None


@contextlib.contextmanager
def server_share(
    context: dg.OpExecutionContext | dg.AssetExecutionContext,
    database: WikiDatabaseResource,
    ollama: OllamaResource,
) -> Iterator[dict[str, Any]]:
    """The settings that narrow this run to its servers ({} when it uses them all), its leases held meanwhile."""
    settings = run_settings(database, ollama)
    urls = settings.ollama_urls
    share = spread.servers_per_run(len(urls), runs_at_once(context.instance) if len(urls) > 1 else None)
    if share >= len(urls):
        yield {}
        return
    with database.store(settings) as store:
        store.migrate()

        def stop_requested() -> bool:
            return os.path.lexists(settings.stop_file) or store.stop_requested()

        with spread.server_share(
            store,
            urls,
            share,
            log=context.log.info,
            stop_requested=stop_requested,
            api=settings.api,
            model=resolve_model(settings, store),  # a server whose API answers but whose embeds fail comes last
            api_key=settings.api_key if settings.api == "openai" else None,
        ) as held:
            if not held:
                raise dg.Failure(
                    description="stopped on request while waiting for a free model server", allow_retries=False
                )
            context.instance.add_run_tags(context.run_id, {SERVER_TAG: ",".join(str(i) for i in held)})
            yield {"ollama_url": ",".join(urls[i] for i in held)}
