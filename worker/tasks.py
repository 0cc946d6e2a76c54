"""The Celery tasks: plan a job into chunks, run one chunk, merge when the last chunk is in.

`hydra.run_job(job_id)` (main queue, sent by the API, cheap): splits the job's prompts into chunks of
`HYDRA_CHUNK_PROMPTS` (read when the job is planned) and sends one `hydra.run_chunk` per chunk to the model's
queue (`service.core.queue.model_queue`). A redelivered `run_job` does not plan twice (`planned:{id}`, SET NX); if the
planner died half-way, the redelivery sends only the chunks not yet sent.

`hydra.run_chunk(job_id, index, start, stop)` (model queue): moves the job to running when the first chunk starts,
runs the engine on prompts `start:stop` (every prompt of the job stays a resample source), reports progress summed
over chunks, stores its partial result, and the chunk that completes the set merges them into the JobResult.
Every failure becomes the job's error, never a crashed worker; a failed or cancelled job stops its running chunks
at their next prompt and revokes (or, when they start, skips) the queued ones. Each start of a chunk is counted:
the delivery after `HYDRA_MAX_DELIVERIES` fails the job (its worker keeps dying). Delivery and time-limit settings
are described in service/core/queue.py. Redis keys are described in service/core/chunk_book.py.

Faults (docs/operations/guarantees.md):
- A chunk runs under a lease with the run's own token (service/core/leases.py), renewed by a heartbeat thread; a
  second delivery while the lease lives does not run, and a run that lost its lease stops at its next prompt and
  records nothing. A chunk whose worker vanished is sent again by any worker's sweep (service/core/recovery.py).
- Every Redis call of a chunk rides out an outage of up to HYDRA_REDIS_OUTAGE_S (worker/redis_retry.py), Redis
  refusing writes included (full at maxmemory, or unable to write its append-only file); after a longer one the
  chunk fails its job with that reason as soon as Redis is back. The worker itself stays up: its broker
  connection takes refused writes for a lost connection and reconnects (worker/broker_transport.py).
- Errors: the engine's InputError (worker/engine/errors.py) is the user's to fix and becomes the job's error as
  is; anything else is a bug, logged with its traceback and reported as an internal error (no traceback).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from functools import cache
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery import Task

from hydra_ablate_client.vocabulary import ACTIVE_STATES
from hydra_ablate_client.wire import JobSpec, encode
from service.core.chunk_book import LEASE_LOST, Chunk, ChunkBook, plan_chunks
from service.core.leases import Leases
from service.core.queue import (
    TASK_DELIVER_CALLBACK,
    TASK_RUN_CHUNK,
    TASK_RUN_JOB,
    model_queue,
    time_limits,
    webhook_queue,
)
from service.core.redis_replies import bytes_or_none
from service.core.resolve import ablation_count
from service.core.store import JobStore
from worker import stats_recorder
from worker.celery_app import app, service_settings, worker_settings
from worker.model_cache import ModelCache, parse_dtype
from worker.model_sources import configured_sources
from worker.redis_retry import RedisOutage, RedisRetry, is_retryable

log = logging.getLogger(__name__)
REDIS_SOCKET_TIMEOUT_S = 10.0


@cache
def job_store() -> JobStore:
    from service.core.callbacks import finish_hook
    from worker.stats_recorder import job_finished

    # A socket timeout: a Redis that hangs (rather than refuses) must not hang a chunk past its retry budget.
    store = JobStore.from_settings(service_settings(), socket_timeout=REDIS_SOCKET_TIMEOUT_S)
    # A job this worker finishes (or fails) is timed and gets its webhook queued on the webhook queue, which a
    # worker of its own consumes (worker/callback_delivery.py).
    queue_name = webhook_queue(service_settings().queue_name)
    notify = finish_hook(
        store, lambda job_id: app.send_task(TASK_DELIVER_CALLBACK, args=[job_id, 1], queue=queue_name)
    )

    def on_finished(job_id: str) -> None:
        job_finished(store, job_id)
        notify(job_id)

    store.on_finished = on_finished
    return store


@cache
def chunk_book() -> ChunkBook:
    return ChunkBook.for_store(job_store())


@cache
def leases() -> Leases:
    return Leases.for_store(job_store())


@cache
def model_cache() -> ModelCache:
    """One cache per worker process: models load on first use and stay (LRU by count and parameter bytes)."""
    return ModelCache(
        configured_sources(),
        capacity=worker_settings().model_cache_size,
        device=worker_settings().device,
        max_bytes=worker_settings().model_cache_bytes,
        dtype=parse_dtype(worker_settings().dtype),
        clean_cache_bytes=worker_settings().clean_cache_bytes,
    )


def _job_state(store: JobStore, job_id: str) -> str | None:
    raw = bytes_or_none(store.client.hget(store.keys.job(job_id), "status"))
    return None if raw is None else raw.decode()


def _stop_other_chunks(job_id: str, own_task_id: str | None = None) -> None:
    """Revoke the queued chunks of a job that ended early (once per job); any that start anyway skip themselves."""
    book = chunk_book()
    if not book.claim_revoke(job_id):
        return
    pending = [task_id for task_id in book.pending_task_ids(job_id) if task_id != own_task_id]
    if pending:
        try:
            app.control.revoke(pending)
        except Exception as error:  # noqa: BLE001 - revoking is an optimisation: skipped chunks stop themselves
            log.warning("job %s: could not revoke %d queued chunks: %s", job_id, len(pending), error)


def _fail(job_id: str, error: str, own_task_id: str | None = None) -> str:
    job_store().mark_failed(job_id, error)
    _stop_other_chunks(job_id, own_task_id)
    return "failed"


class HydraTask(Task):
    """Tasks whose every escaped failure fails the job, so no job stays `running` after its task ended.

    The hard time limit lands here too (the worker's main process calls `on_failure` then).
    """

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        if not args:
            return
        job_id = args[0]
        if is_retryable(exc):
            # Redis went away (or refused writes) outside the retried calls: the job is not failed for a blip. An
            # unplanned job is sent again and a chunk's lapsed lease is reaped by the recovery sweep
            # (service/core/recovery.py).
            log.warning("job %s: %s lost Redis (%s); the recovery sweep will send it again", job_id, self.name, exc)
            return
        if self.name == TASK_RUN_CHUNK and isinstance(exc, TimeLimitExceeded):
            _, hard = time_limits(service_settings())
            reason = (
                f"chunk {args[1]} of job {job_id} ran past the hard time limit of {hard:.0f} s and was killed; "
                "raise HYDRA_CHUNK_TIME_LIMIT_S or lower HYDRA_CHUNK_PROMPTS"
            )
        else:
            reason = f"internal error in {self.name}: {type(exc).__name__}: {exc}"
        try:
            _fail(job_id, reason, task_id)
        except Exception:
            log.exception("job %s: could not record its failure (%s)", job_id, reason)


def send_chunk(job_id: str, chunk: Chunk, model_id: str, task_id: str | None = None) -> str:
    """Queue one chunk on its model's queue; returns the task id (recorded so a stopped job can revoke it)."""
    args = [job_id, chunk.index, chunk.start, chunk.stop]
    queue = model_queue(service_settings().queue_name, model_id)
    return str(run_chunk.apply_async(args=args, queue=queue, task_id=task_id).id)


@app.task(name=TASK_RUN_JOB, base=HydraTask)
def run_job(job_id: str) -> str:
    """Plan a queued job into chunks and queue them on the model's queue; cheap, runs on any worker."""
    store, book = job_store(), chunk_book()
    spec = store.spec(job_id)
    if spec is None:
        log.warning("job %s is unknown or expired; dropping it", job_id)
        store.mark_planned(job_id)
        return "missing"
    if _job_state(store, job_id) not in ACTIVE_STATES:
        store.mark_planned(job_id)
        return "skipped"
    claimed = book.claim_planning(job_id)
    chunks = book.plan(job_id)
    if chunks is None:
        if not claimed:
            log.warning("job %s was claimed for planning but has no plan (its planner died?); planning it", job_id)
        size = service_settings().chunk_prompts
        chunks = plan_chunks(len(spec.prompts), size)
        phase_one = 0
        if spec.verify is not None:  # estimates first; the same ranges again for the exact phase (sent later)
            phase_one = len(chunks)
            chunks = chunks + [Chunk(phase_one + c.index, c.start, c.stop) for c in chunks]
        book.record_plan(job_id, chunks, size, estimate_chunks=phase_one)
    # A job with verify sends its estimate chunks now; the last of them to finish sends the exact ones.
    first = book.estimate_chunks(job_id) or len(chunks)
    sent = book.task_ids(job_id)
    if not claimed and len([i for i in sent if i < first]) >= first:
        store.mark_planned(job_id)
        return "already planned"
    for chunk in chunks[:first]:
        if chunk.index in sent:
            continue
        # Marked before it is sent, so that a chunk that starts at once is never marked after its run took the lease.
        task_id = uuid.uuid4().hex
        leases().mark_queued(job_id, chunk.index, task_id, worker_settings().recheck_s)
        book.record_task(job_id, chunk.index, send_chunk(job_id, chunk, spec.model, task_id))
    store.mark_planned(job_id)
    log.info("job %s: %d prompts in %d chunks", job_id, len(spec.prompts), first)
    return f"planned {first} chunks"


def _merge(job_id: str, spec: JobSpec, n_chunks: int) -> str:
    """Build the JobResult from every chunk's partial result and finish the job (idempotent)."""
    from worker.chunk_execution import NoPromptKept, merge_chunks

    store, book = job_store(), chunk_book()
    partial = book.results(job_id, range(n_chunks))
    missing = [i for i, chunk in enumerate(partial) if chunk is None]
    if missing:
        return _fail(job_id, f"internal error: the partial results of chunks {missing} of job {job_id} are missing")
    store.advance_phase(job_id, "merging")
    try:
        merged = merge_chunks(job_id, spec, [chunk for chunk in partial if chunk is not None])
    except NoPromptKept as error:
        return _fail(job_id, str(error))
    except Exception as error:
        log.exception("job %s: merging its chunks failed", job_id)
        return _fail(job_id, f"internal error: merging the chunks failed: {type(error).__name__}: {error}")
    if store.mark_succeeded(job_id, encode(merged)):
        book.drop_results(job_id, range(n_chunks))
        return "succeeded"
    return "merged after the job ended"


def _send_exact_phase(job_id: str, spec: JobSpec, n_estimate_chunks: int) -> str:
    """Jobs with verify, once every estimate chunk is recorded: choose the verification set from their estimates and
    send the exact chunks (idempotent: the set is stored once, and a redelivery sends only chunks not yet sent, as
    `run_job` does; a chunk sent twice anyway runs once under its lease)."""
    from worker.verify_jobs import choose_verified

    store, book = job_store(), chunk_book()
    if _job_state(store, job_id) != "running":
        return "skipped"
    chunks = book.plan(job_id) or []
    exact = [c for c in chunks if c.index >= n_estimate_chunks]
    claimed = book.claim_exact_phase(job_id)
    sent = book.task_ids(job_id)
    if not claimed and all(c.index in sent for c in exact):
        return "duplicate"
    if book.verified(job_id) is None:
        partial = book.results(job_id, range(n_estimate_chunks))
        missing = [i for i, chunk in enumerate(partial) if chunk is None]
        if missing:
            return _fail(job_id, f"internal error: the estimates of chunks {missing} of job {job_id} are missing")
        verified = book.claim_verified(job_id, choose_verified(spec, [c for c in partial if c is not None]))
        log.info("job %s: verifying %d of %d components exactly", job_id, len(verified), len(spec.components))
    for chunk in exact:
        if chunk.index in sent:
            continue
        task_id = uuid.uuid4().hex
        leases().mark_queued(job_id, chunk.index, task_id, worker_settings().recheck_s)
        book.record_task(job_id, chunk.index, send_chunk(job_id, chunk, spec.model, task_id))
    return "estimated"


def _holder_is_dead(holder: str) -> bool:
    """A lease token names its process (host:pid:random): a holder on this machine whose process is gone (a killed
    pool process, redelivered at once by Celery) need not wait for its lease to expire."""
    host, _, rest = holder.partition(":")
    pid_text, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class ChunkRun:
    """One run of one chunk: its lease and heartbeat, its Redis retries, its outcome recorded exactly once."""

    def __init__(self, task_id: str | None, job_id: str, index: int, start: int, stop: int) -> None:
        self.task_id = task_id
        self.job_id, self.index, self.start, self.stop = job_id, index, start, stop
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        self.retry = RedisRetry(worker_settings().redis_outage_s)
        self.store, self.book, self.leases = job_store(), chunk_book(), leases()
        self.lost = threading.Event()  # set by the heartbeat once another run has the lease
        self._finished = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @property
    def prompts(self) -> str:
        return f"prompts {self.start}-{self.stop - 1}"

    def redis(self, what: str, fn: Any) -> Any:
        return self.retry.call(what, fn)

    def read(self, what: str, fn: Any) -> Any:
        """A Redis read: retried like any call, but working while writes are refused ends no outage."""
        return self.retry.call(what, fn, writes=False)

    # the lease
    def _renew_until_finished(self) -> None:
        while not self._finished.wait(worker_settings().renew_s):
            try:
                renewed = self.leases.renew(self.job_id, self.index, self.token, worker_settings().lease_s)
            except Exception as error:
                if is_retryable(error):
                    continue  # Redis is away or full: the lease outlives any outage the chunk rides out
                raise
            if not renewed:
                log.warning("job %s: chunk %d lost its lease to another run; stopping", self.job_id, self.index)
                self.lost.set()
                return

    def _start_heartbeat(self) -> None:
        self._heartbeat = threading.Thread(target=self._renew_until_finished, name="hydra-lease", daemon=True)
        self._heartbeat.start()

    def _release(self) -> None:
        self._finished.set()
        try:
            self.leases.release(self.job_id, self.index, self.token)
        except Exception as error:
            if not is_retryable(error):
                raise
            # the lease expires by itself; a sweep then finds the chunk done (or its job ended)

    def _fail(self, error: str) -> str:
        """Fail the job, unless another run has taken the chunk over (then this run just stops)."""
        outcome = self.redis(
            "record the job's failure",
            lambda: self.leases.fail_if_holder(self.store, self.job_id, self.index, self.token, error),
        )
        if outcome < 0:
            log.warning("job %s: chunk %d lost its lease; not recording: %s", self.job_id, self.index, error)
            return "lease lost"
        _stop_other_chunks(self.job_id, self.task_id)
        return "failed"

    def run(self) -> str:
        try:
            return self._run()
        except RedisOutage as outage:
            return self._give_up(outage)
        finally:
            self._finished.set()

    def _give_up(self, outage: RedisOutage) -> str:
        """Redis stayed away longer than the budget: fail the job with that reason once Redis is back."""
        reason = (
            f"chunk {self.index} ({self.prompts}) of job {self.job_id} stopped: {outage}; retry the job once Redis "
            "is stable, or raise HYDRA_REDIS_OUTAGE_S"
        )
        log.error("job %s: %s", self.job_id, reason)
        _, hard = time_limits(service_settings())
        outcome = self.retry.until_back(
            "record the job's failure",
            lambda: self.leases.fail_if_holder(self.store, self.job_id, self.index, self.token, reason),
            limit_s=hard,
        )
        self._release()
        return "failed" if outcome >= 0 else "lease lost"

    def _run(self) -> str:
        job_id, index = self.job_id, self.index
        store, book = self.store, self.book
        spec = self.read("read the job", lambda: store.spec(job_id))
        if spec is None:
            log.warning("job %s is unknown or expired; dropping its chunk %d", job_id, index)
            return "missing"
        state = self.read("read the job's state", lambda: _job_state(store, job_id))
        n_chunks = self.read("read the chunk plan", lambda: book.n_chunks(job_id))
        if n_chunks is None:
            if state in ACTIVE_STATES:
                error = f"internal error: job {job_id} has no chunk plan (expired?)"
                self.redis("record the job's failure", lambda: store.mark_failed(job_id, error))
                _stop_other_chunks(job_id, self.task_id)
                return "failed"
            return "missing"
        if self.read("read the chunk's outcome", lambda: book.is_done(job_id, index)):
            # A redelivery of a finished chunk (or sent again by a sweep): if the worker that was to merge died,
            # merge now.
            self.redis("drop the chunk's lease", lambda: self.leases.release(job_id, index))
            done = self.read("read the chunks done", lambda: book.done_indices(job_id))
            if state == "running" and len(done) == n_chunks:
                return self._merge(spec, n_chunks)
            first = self.read("read the chunk plan", lambda: book.estimate_chunks(job_id))
            if state == "running" and index < first and all(i in done for i in range(first)):
                # The chunk that completed the estimates may have died before it sent the exact phase.
                sent = self.redis("send the exact phase", lambda: _send_exact_phase(job_id, spec, first))
                return "duplicate" if sent == "duplicate" else str(sent)
            return "duplicate"
        if state not in ACTIVE_STATES:
            self.redis("drop the chunk's lease", lambda: self.leases.release(job_id, index))
            _stop_other_chunks(job_id, self.task_id)
            return "skipped"
        holder = self.redis(
            "take the chunk's lease",
            lambda: self.leases.acquire(job_id, index, self.token, worker_settings().lease_s, dead=_holder_is_dead),
        )
        if holder is not None:
            log.warning("job %s: chunk %d is running elsewhere (%s); not running it twice", job_id, index, holder)
            return "running elsewhere"
        self._start_heartbeat()
        try:
            return self._run_leased(spec, state, n_chunks)
        finally:
            self._release()

    def _run_leased(self, spec: JobSpec, state: str | None, n_chunks: int) -> str:
        from worker.chunk_execution import execute_chunk
        from worker.engine.errors import InputError
        from worker.engine.sweep import SweepCancelled
        from worker.verify_jobs import estimate_only_chunk, exact_spec

        job_id, index, store, book = self.job_id, self.index, self.store, self.book
        deliveries = self.redis("count the delivery", lambda: book.count_delivery(job_id, index))
        limit = service_settings().max_deliveries
        if deliveries > limit:
            return self._fail(
                f"chunk {index} ({self.prompts}) of job {job_id} was delivered {deliveries} times; "
                f"its worker keeps dying (out of memory?). At most {limit} deliveries are allowed "
                "(HYDRA_MAX_DELIVERIES); fewer prompts per chunk (HYDRA_CHUNK_PROMPTS) need less memory"
            )
        if deliveries > 1:
            log.warning("job %s: chunk %d delivered again (%d of at most %d)", job_id, index, deliveries, limit)
        if state == "queued":
            claimed = self.redis("mark the job running", lambda: store.mark_running(job_id))
            if not claimed and self.read("read the job's state", lambda: _job_state(store, job_id)) != "running":
                return "skipped"  # cancelled between the two reads

        status = self.read("read the job", lambda: store.status(job_id))
        total = status.progress.total if status is not None and status.progress.total else ablation_count(spec)

        per_prompt = max(1, total // max(1, len(spec.prompts)))  # every prompt has the same number of ablations

        def report(done: int) -> None:
            summed = book.record_progress(job_id, index, done)
            store.set_progress(job_id, summed, total, prompts_done=summed // per_prompt)

        def on_progress(done: int, _chunk_total: int) -> None:
            # Skipped while Redis is away (the next report catches up; progress only ever rises).
            self.retry.poll("report progress", lambda: report(done), None)

        def on_phase(phase: str) -> None:
            self.retry.poll("report the phase", lambda: store.advance_phase(job_id, phase), False)

        def should_stop() -> bool:
            if self.lost.is_set():
                return True
            return bool(
                self.retry.poll(
                    "check for a cancel",
                    lambda: _job_state(store, job_id) != "running"
                    or not self.leases.still_holds(job_id, index, self.token),
                    False,
                    writes=False,
                )
            )

        first = self.read("read the chunk plan", lambda: book.estimate_chunks(job_id))
        run_spec = spec
        if first and index >= first:  # the exact phase of a job with verify: only the verified components
            verified = self.read("read the verification set", lambda: book.verified(job_id))
            if verified is None:
                return self._fail(f"internal error: chunk {index} of job {job_id} has no verification set")
            run_spec = exact_spec(spec, verified)
        try:
            on_phase("loading_model")
            cache = model_cache()
            loaded = stats_recorder.load_model(store, spec.model in cache.cached, lambda: cache.get(spec.model))
            chunk_started = time.perf_counter()
            if index < first:
                result = estimate_only_chunk(
                    job_id, spec, loaded, index, self.start, self.stop, should_stop=should_stop, on_phase=on_phase
                )
            else:
                result = execute_chunk(
                    job_id, run_spec, loaded, index, self.start, self.stop, on_progress=on_progress,
                    should_stop=should_stop, on_phase=on_phase, batch_tokens=worker_settings().batch_tokens,
                )
        except SweepCancelled:
            if self.lost.is_set() or not self.read(
                "check the lease", lambda: self.leases.still_holds(job_id, index, self.token)
            ):
                log.warning("job %s: chunk %d stopped: another run holds its lease", job_id, index)
                return "lease lost"
            log.info("job %s stopped while chunk %d ran", job_id, index)
            _stop_other_chunks(job_id, self.task_id)
            return "stopped"
        except SoftTimeLimitExceeded:
            soft, _ = time_limits(service_settings())
            return self._fail(
                f"chunk {index} ({self.prompts}) of job {job_id} ran past the time limit of {soft:.0f} s; "
                "raise HYDRA_CHUNK_TIME_LIMIT_S or lower HYDRA_CHUNK_PROMPTS"
            )
        except RedisOutage:
            raise
        except InputError as error:
            return self._fail(str(error))
        except Exception as error:
            log.exception("job %s: chunk %d failed", job_id, index)
            return self._fail(
                f"internal error in chunk {index} of job {job_id}: {type(error).__name__}: {error} "
                "(the worker's log has the details)"
            )
        ablations = 0 if index < first else (self.stop - self.start) * per_prompt  # estimate chunks ablate nothing
        stats_recorder.chunk_done(store, time.perf_counter() - chunk_started, ablations)
        done = self.redis(
            "record the chunk's result", lambda: book.record_result(job_id, index, result, self.token)
        )
        if done == LEASE_LOST:
            log.warning("job %s: chunk %d finished after another run took its lease; not recorded", job_id, index)
            return "lease lost"
        if done < 0:
            return "duplicate"
        if done == n_chunks:
            return self._merge(spec, n_chunks)
        if first and done == first:  # the last estimate chunk in (exact chunks start only after all of them)
            return str(self.redis("send the exact phase", lambda: _send_exact_phase(job_id, spec, first)))
        return "recorded"

    def _merge(self, spec: JobSpec, n_chunks: int) -> str:
        return str(self.redis("merge the job", lambda: _merge(self.job_id, spec, n_chunks)))


@app.task(name=TASK_RUN_CHUNK, base=HydraTask, bind=True)
def run_chunk(self: Task, job_id: str, index: int, start: int, stop: int) -> str:
    """Run prompts `start:stop` of a job under a lease; the chunk that completes the job merges it."""
    return ChunkRun(self.request.id, job_id, index, start, stop).run()
