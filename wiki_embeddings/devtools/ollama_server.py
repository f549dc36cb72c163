"""The Ollama-protocol dev server's entry point: ``python -m wiki_embeddings.devtools.ollama_server [flags]``.

The server lives in the package :mod:`wiki_embeddings.devtools.ollama_dev` (models and tokenizers, faults,
request binding, routes, process control); this module keeps the name that operators, scripts and tests
use, and re-exports the package's public names (its ``__all__``).
"""

import sys

from wiki_embeddings.devtools.ollama_dev import *  # noqa: F403 (the package's __all__, re-exported as is)
from wiki_embeddings.devtools.ollama_dev import __all__ as __all__
from wiki_embeddings.devtools.ollama_dev.process import main

if __name__ == "__main__":
    sys.exit(main())
