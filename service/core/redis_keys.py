"""Every Redis key name the project writes, built here and nowhere else, all under the configured prefix.

  job:{id}             hash: id, status, model, owner (the API key's name), spec (JobSpec JSON), created_at,
                       started_at, finished_at (ISO-8601 UTC), error, done, total, name, tags (JSON list), metadata
                       (JSON object), callback_url, phase, prompts_done / prompts_total, note
  jobs                 sorted set of job ids scored by creation time (newest first when paged)
  jobs:owner:{name}    the same, for one owner's jobs only (so a key's listing never scans everyone's)
  active:{name}        set of an owner's job ids that may still be queued or running (pruned when counted)
  result:{id}          the encoded JobResult, gzip-compressed (results of the full preset are tens of MB of JSON)
  cancel:{id}          present once a cancel was requested; the worker polls it between batches
  by-status:{state}    sorted set of the job ids in that state, scored by when the job expires (unix s): the counts
                       of /metrics (service/core/store/track_status.lua); by-status-ready once older jobs were added
  unplanned            sorted set of job ids stored but not yet planned by a worker, scored by when to send them
                       again (service/core/recovery.py)
  events:{id}          stream of the job's status snapshots, one per change (service/core/events.py); the channel
                       `job-events` carries the id of each job that changed (service/core/event_hub.py)
  callbacks:{id}       list of CallbackAttempt JSON, one per webhook delivery attempt (service/core/callbacks.py)
  callback_secrets     hash: owner → webhook signing secret
  figures:{id}         set of the job's cached figure keys; figure:{id}:{name}:{fmt}{options} one rendered figure
  models               hash: model id → ModelInfo JSON, as advertised by workers; served:{model} a worker's
                       heartbeat for it; refused_models hash: model id → why no worker can serve it
  tokenizer:{model}    the model's Hugging Face tokenizers JSON, as published by workers
  plan:{id}, planned:{id}, chunk_tasks:{id}, revoked:{id}, deliveries:{id}, progress:{id}, chunks_done:{id},
  chunk:{id}:{index}   the chunk book of a job (service/core/chunk_book.py): its plan, sent tasks, deliveries,
                       progress per chunk, recorded chunks and their partial results
  lease:{id}:{index}   a running chunk's lease; leases: sorted set of every lease (service/core/leases.py)
  apikeys              hash: key digest → key record (service/core/api_keys.py)
  metrics              hash of the workers' counters (service/core/worker_stats.py)
  idem:{owner}:{sha256} an idempotency record (service/api/idempotency.py)
  rate:{bucket}:{name} a rate-limit counter (service/api/rate_limits.py)
  ui:session:{sha256}  a web page session (service/api/ui/session.py)
The job keys expire `ttl_s` after the job's latest state change, so results live that long after finishing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = "hydra:"

    # jobs
    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    @property
    def job_prefix(self) -> str:
        """`job(id)` is this followed by the id (a Lua script builds job keys from it)."""
        return self.job("")

    def by_status(self, state: str) -> str:
        """The sorted set of the jobs in `state`, scored by when each expires (store/track_status.lua builds this
        name from the job's key: keep the two alike)."""
        return f"{self.prefix}by-status:{state}"

    @property
    def by_status_ready(self) -> str:
        """Present once the jobs stored before the by-status sets existed were added to them."""
        return f"{self.prefix}by-status-ready"

    def result(self, job_id: str) -> str:
        return f"{self.prefix}result:{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}cancel:{job_id}"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}jobs"

    def owner_jobs(self, owner: str) -> str:
        return f"{self.prefix}jobs:owner:{owner}"

    def active(self, owner: str) -> str:
        return f"{self.prefix}active:{owner}"

    @property
    def unplanned(self) -> str:
        return f"{self.prefix}unplanned"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}events:{job_id}"

    @property
    def events_channel(self) -> str:
        """The Pub/Sub channel on which each appended event's job id is published (channels are not keys)."""
        return f"{self.prefix}job-events"

    def callbacks(self, job_id: str) -> str:
        return f"{self.prefix}callbacks:{job_id}"

    @property
    def callback_secrets(self) -> str:
        return f"{self.prefix}callback_secrets"

    # figures
    def figures(self, job_id: str) -> str:
        """The set of the job's cached figure keys (one per name, format and size asked for)."""
        return f"{self.prefix}figures:{job_id}"

    def figure(self, job_id: str, name: str, fmt: str, suffix: str = "") -> str:
        return f"{self.prefix}figure:{job_id}:{name}:{fmt}{suffix}"

    # models
    @property
    def models(self) -> str:
        return f"{self.prefix}models"

    def served(self, model_id: str) -> str:
        return f"{self.prefix}served:{model_id}"

    @property
    def refused_models(self) -> str:
        return f"{self.prefix}refused_models"

    def tokenizer(self, model_id: str) -> str:
        return f"{self.prefix}tokenizer:{model_id}"

    # chunks
    def chunk_book(self, kind: str, job_id: str) -> str:
        """plan, planned, chunk_tasks, revoked, deliveries, progress or chunks_done of a job."""
        return f"{self.prefix}{kind}:{job_id}"

    def chunks_done(self, job_id: str) -> str:
        return self.chunk_book("chunks_done", job_id)

    def chunk_partials(self, job_id: str) -> str:
        """A chunk's partial result is this followed by the chunk's index."""
        return f"{self.prefix}chunk:{job_id}:"

    def chunk_result(self, job_id: str, index: int) -> str:
        return f"{self.chunk_partials(job_id)}{index}"

    @property
    def lease_prefix(self) -> str:
        """`lease(id, index)` is this followed by `{id}:{index}` (a Lua script builds lease keys from it)."""
        return f"{self.prefix}lease:"

    def lease(self, job_id: str, index: int) -> str:
        return f"{self.lease_prefix}{job_id}:{index}"

    @property
    def leases(self) -> str:
        return f"{self.prefix}leases"

    # access, limits, sessions, counters
    @property
    def api_keys(self) -> str:
        return f"{self.prefix}apikeys"

    @property
    def worker_metrics(self) -> str:
        return f"{self.prefix}metrics"

    def idempotency(self, owner: str, key: str) -> str:
        return f"{self.prefix}idem:{owner}:{_digest(key)}"

    def rate_counter(self, bucket: str, name: str) -> str:
        return f"{self.prefix}rate:{bucket}:{name}"

    def ui_session(self, session_id: str) -> str:
        return f"{self.prefix}ui:session:{_digest(session_id)}"
