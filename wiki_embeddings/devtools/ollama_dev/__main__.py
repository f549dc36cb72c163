"""``python -m wiki_embeddings.devtools.ollama_dev``: the same command line as ``-m ...ollama_server``."""

import sys

from wiki_embeddings.devtools.ollama_dev.process import main

if __name__ == "__main__":
    sys.exit(main())
