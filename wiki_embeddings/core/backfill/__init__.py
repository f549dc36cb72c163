"""One backfill run as stages, each owning its state (see run.py for how they are wired):

prepare  - checks that refuse a run before anything is written; the bulk-load index policy
halt     - stop requests and the first fatal error
dbcalls  - database calls that survive reconnects, deadlines and stop requests
claimer  - keyset claims, what the run holds, the busy retry
worker   - request shaping, context fit, isolation, truncation checks -> outcomes
writer   - the bulk write, refused rows isolated
failures - isolated chunks recorded (database + JSONL)
endstate - the end state, a pure function of the run's counts
report   - the run report and exit codes
"""

from wiki_embeddings.core.backfill.errors import DimensionMismatch, ModelChanged
from wiki_embeddings.core.backfill.report import CLEAN_STATES, EXIT_CODES, RunReport
from wiki_embeddings.core.backfill.run import Backfill, describe_tuning
from wiki_embeddings.core.backfill.worker import CANARY_TEXT, WINDOW_PROBE_TEXTS

__all__ = [
    "CANARY_TEXT",
    "CLEAN_STATES",
    "EXIT_CODES",
    "Backfill",
    "DimensionMismatch",
    "ModelChanged",
    "WINDOW_PROBE_TEXTS",
    "RunReport",
    "describe_tuning",
]
