"""The code location of the spread test's daemon: the shipped embedding asset and resources, nothing else (the
sensors and the automation of the shipped definitions would start runs of their own on a 2-core machine)."""

import dagster as dg

from wiki_embeddings.definitions import build_resources
from wiki_embeddings.defs.assets import wiki_chunk_embeddings

defs = dg.Definitions(assets=[wiki_chunk_embeddings], resources=build_resources())
