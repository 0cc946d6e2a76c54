"""The job store in Redis, shared by the API (answers 404/409 itself) and the Celery worker (moves jobs on).

One module per thing stored: jobs.py (the job hashes and their state changes; JobStore, the whole store, is
defined there), results.py, event_log.py, callback_log.py, cached_figures.py, model_registry.py, job_listing.py;
job_records.py reads and writes a job's fields; the Lua scripts are the `.lua` files here (lua.py loads them);
key names come from service/core/redis_keys.py. Importers take the names below from `service.core.store`.
"""

from hydra_ablate_client.vocabulary import ACTIVE_STATES, TERMINAL_STATES
from service.core.store.job_listing import JobFilter
from service.core.store.job_records import ActiveJobsExceeded, JobLabels, utc_now
from service.core.store.jobs import LOOP_SCRIPTS, RESEND_AFTER_S, RESEND_MAX_S, JobStore
from service.core.store.results import GZIP_MAGIC

__all__ = [
    "ACTIVE_STATES",
    "GZIP_MAGIC",
    "LOOP_SCRIPTS",
    "RESEND_AFTER_S",
    "RESEND_MAX_S",
    "TERMINAL_STATES",
    "ActiveJobsExceeded",
    "JobFilter",
    "JobLabels",
    "JobStore",
    "utc_now",
]
