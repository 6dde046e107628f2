"""Shadow runs: a job its alias picked for its shadow version runs on that version too, after its
own result was committed and its final event published, so the job's result and latency never
wait for the shadow, and a failing shadow never fails the job. The shadow's output is stored apart
(`shadow_runs`), never as the job's result, with how far it agrees with the job's own result."""

from __future__ import annotations

import functools
import logging
import math
import time
import uuid
from typing import Any

from db.jobs import Outcome
from db.models import Job, JobStatus, ShadowRun, utcnow
from db.rollouts import record_shadow
from db.session import session_scope
from tasks.registry import JobKind
from worker.job_context import JobContexts, pins_of
from worker.retry import with_retries

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000


def agreement(primary: dict[str, Any] | None, shadow: dict[str, Any] | None) -> float | None:
    """Classifiers: the share of texts given the same top label; embedders: the mean cosine of
    their vectors; None when the results cannot be compared."""
    primary, shadow = primary or {}, shadow or {}
    p, s = primary.get("predictions"), shadow.get("predictions")
    if isinstance(p, list) and isinstance(s, list) and p and len(p) == len(s):
        same = sum(
            isinstance(a, dict) and isinstance(b, dict) and a.get("label") == b.get("label")
            for a, b in zip(p, s, strict=True)
        )
        return same / len(p)
    p, s = primary.get("embeddings"), shadow.get("embeddings")
    if isinstance(p, list) and isinstance(s, list) and p and len(p) == len(s):
        return sum(cosine(a, b) for a, b in zip(p, s, strict=True)) / len(p)
    return None


def cosine(a: list[float], b: list[float]) -> float:
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return 0.0 if norm == 0 else sum(x * y for x, y in zip(a, b, strict=False)) / norm


class Shadows:
    def __init__(self, database_url: str, contexts: JobContexts) -> None:
        self.database_url = database_url
        self.contexts = contexts

    def run(
        self, kind: JobKind[Any, Any], jobs: list[Job], outcomes: list[Outcome], written: set[uuid.UUID]
    ) -> None:
        """Run the committed, succeeded jobs that were picked for a shadow on it, grouped by
        version; record each outcome. Never raises: the jobs are final already."""
        results = {
            o.job_id: o.result for o in outcomes if o.job_id in written and o.status == JobStatus.SUCCEEDED
        }
        due = [job for job in jobs if job.shadow_version is not None and job.id in results]
        groups: dict[tuple[str, str | None, int], list[Job]] = {}
        for job in due:
            assert job.shadow_version is not None
            groups.setdefault((job.tenant, job.model, job.shadow_version), []).append(job)
        for group in groups.values():
            try:
                runs = self.run_group(kind, group, results)
                record = functools.partial(self.record, runs)
                with_retries(record, what=f"record shadow runs of job {group[0].id}")
            except Exception:
                log.warning("shadow runs of %d job(s) not recorded", len(group), exc_info=True)

    def run_group(
        self, kind: JobKind[Any, Any], group: list[Job], results: dict[uuid.UUID, dict[str, Any] | None]
    ) -> list[ShadowRun]:
        first = group[0]
        assert first.shadow_version is not None
        ctx = self.contexts.shared(
            first.tenant if kind.reads_tenant_data else None, pins_of(first, first.shadow_version)
        )
        started = time.perf_counter()
        outputs: list[dict[str, Any] | None] = []
        error = None
        try:
            params = [kind.params.model_validate(job.params) for job in group]
            if kind.run_batch is not None:
                outputs = [r.model_dump(mode="json") for r in kind.run_batch(params, ctx)]
            else:
                outputs = [kind.run(p, ctx).model_dump(mode="json") for p in params]
        except Exception as exc:
            error = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"[:MAX_ERROR_CHARS]
            log.warning(
                "shadow run on %s:%d failed for %d job(s): %s",
                first.model,
                first.shadow_version,
                len(group),
                error,
                extra={"job_id": str(first.id)},
            )
            outputs = [None] * len(group)
        run_ms = round((time.perf_counter() - started) * 1000 / len(group), 3)
        now = utcnow()
        return [
            ShadowRun(
                job_id=job.id,
                tenant=job.tenant,
                model=job.model or "",
                version=first.shadow_version,
                primary_version=job.model_version,
                ok=error is None,
                agreement=None if output is None else agreement(results.get(job.id), output),
                output=output,
                error=error,
                run_ms=run_ms,
                created_at=now,
            )
            for job, output in zip(group, outputs, strict=True)
        ]

    def record(self, runs: list[ShadowRun]) -> None:
        with session_scope(self.database_url) as session:
            for run in runs:
                record_shadow(session, run)
