"""How a job's hash is written and read: its fields, its status, its labels (no Redis calls here)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from hydra_ablate_client.vocabulary import TERMINAL_STATES
from hydra_ablate_client.wire import JobSpec, JobStatus, Progress
from service.core.redis_replies import EncodableT, FieldT, as_bytes


@dataclass(frozen=True)
class JobLabels:
    """What a submitter attaches to a job besides the spec: for people and tools, never read by the engine."""

    name: str | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    callback_url: str | None = None


class ActiveJobsExceeded(Exception):
    """An owner already has `cap` queued or running jobs; the API answers 429 and names both numbers."""

    def __init__(self, owner: str, active: int, cap: int) -> None:
        super().__init__(f"{owner} has {active} queued or running jobs (limit {cap})")
        self.owner = owner
        self.active = active
        self.cap = cap


def utc_now() -> str:
    """ISO-8601 UTC with milliseconds and a Z, e.g. 2025-11-25T12:00:00.123Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def label_fields(labels: JobLabels) -> dict[FieldT, EncodableT]:
    fields: dict[FieldT, EncodableT] = {}
    if labels.name is not None:
        fields["name"] = labels.name
    if labels.tags:
        fields["tags"] = msgspec.json.encode(labels.tags)
    if labels.metadata:
        fields["metadata"] = msgspec.json.encode(labels.metadata)
    if labels.callback_url is not None:
        fields["callback_url"] = labels.callback_url
    return fields


def text(value: bytes | str | None) -> str | None:
    return None if value is None else as_bytes(value).decode()


# What a status read fetches of the job's hash (everything but the spec, which may hold thousands of prompts).
STATUS_FIELDS = (
    "status", "id", "model", "done", "total", "prompts_done", "prompts_total", "error", "created_at", "started_at",
    "finished_at", "owner", "phase", "name", "tags", "metadata", "callback_url", "note",
)  # fmt: skip


def status_fields(values: list[bytes | None]) -> dict[bytes, bytes]:
    return {name.encode(): value for name, value in zip(STATUS_FIELDS, values, strict=True) if value is not None}


def unless_evicted(status: JobStatus, has_result: bool) -> JobStatus:
    """A succeeded job must have its result: without it (an evicting Redis dropped the key) it reads as failed."""
    if status.status != "succeeded" or has_result:
        return status
    return msgspec.structs.replace(status, status="failed", error=EVICTED)


def new_job(
    spec: JobSpec, total: int, owner: str | None, job_id: str | None, labels: JobLabels | None
) -> tuple[JobStatus, dict[FieldT, EncodableT]]:
    """A queued job's status and the fields of its hash."""
    job_id = job_id or uuid.uuid4().hex
    now = utc_now()
    labels = labels or JobLabels()
    fields: dict[FieldT, EncodableT] = {
        "id": job_id,
        "status": "queued",
        "model": spec.model,
        "spec": msgspec.json.encode(spec),
        "created_at": now,
        "done": 0,
        "total": int(total),
        "phase": "queued",
        "prompts_done": 0,
        "prompts_total": len(spec.prompts),
        **label_fields(labels),
    }
    status = JobStatus(
        id=job_id,
        status="queued",
        model=spec.model,
        progress=Progress(0, int(total), 0, len(spec.prompts)),
        created_at=now,
        owner=owner,
        name=labels.name,
        tags=list(labels.tags),
        metadata=dict(labels.metadata),
        callback_url=labels.callback_url,
    )
    return status, fields


def created(status: JobStatus, outcome: int, owner: str, max_active: int) -> JobStatus:
    if outcome >= 0:
        raise ActiveJobsExceeded(owner, outcome, int(max_active))
    return status




EVICTED = (
    "the job succeeded but its result is gone from Redis (evicted under memory pressure: the Redis of this "
    "deployment must run with maxmemory-policy noeviction, see docs/operations/deployment.md); submit the job again"
)


def decode_status(fields: dict[bytes, bytes]) -> JobStatus | None:
    if not fields:
        return None
    f: dict[str, Any] = {k.decode(): v.decode() for k, v in fields.items() if k != b"spec"}
    if "id" not in f or "status" not in f:  # a half-expired or foreign hash
        return None
    finished = f["status"] in TERMINAL_STATES
    return JobStatus(
        id=f["id"],
        status=f["status"],
        model=f.get("model", ""),
        progress=Progress(
            int(f.get("done", 0)),
            int(f.get("total", 0)),
            int(f.get("prompts_total", 0)) if f["status"] == "succeeded" else int(f.get("prompts_done", 0)),
            int(f.get("prompts_total", 0)),
        ),
        error=f.get("error"),
        created_at=f.get("created_at", ""),
        started_at=f.get("started_at"),
        finished_at=f.get("finished_at"),
        owner=f.get("owner"),
        phase="finished" if finished else f.get("phase", "queued"),
        name=f.get("name") or None,
        tags=msgspec.json.decode(f["tags"]) if f.get("tags") else [],
        metadata=msgspec.json.decode(f["metadata"]) if f.get("metadata") else {},
        callback_url=f.get("callback_url") or None,
        note=f.get("note"),
    )
