"""The code location of the spread benchmark's Dagster daemon (bench_spread.py): the shipped embedding asset and its
resources from the environment, nothing else. The shipped definitions' sensors and automation would start runs of
their own and share the 2 cores with the runs being timed."""

import dagster as dg

from wiki_embeddings.definitions import build_resources
from wiki_embeddings.defs.assets import wiki_chunk_embeddings

defs = dg.Definitions(assets=[wiki_chunk_embeddings], resources=build_resources())
