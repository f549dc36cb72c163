"""`python -m wiki_embeddings.cli ...` (what the runbook's scripts and the tests' subprocesses run)."""

from wiki_embeddings.cli import main

raise SystemExit(main())
