"""Dagster declarations of the project (loaded through wiki_embeddings/definitions.py)."""

import warnings

import dagster as dg

# Beta APIs used on purpose (backfill_policy, multi_observable_source_asset, sensor owners): their warnings would
# repeat in every process log (webserver, daemon, code server, each run) and hide what matters.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
