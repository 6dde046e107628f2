"""Writing a run's outcomes: final states and model versions in one transaction, then what
follows from them (released jobs republished after a backoff, work directories cleaned)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from db import registry
from db.jobs import Outcome, finish_job, finish_jobs, no_attempts_left, release_job
from db.models import TEXT_CLASSIFIER, Job, JobStatus, utcnow
from db.queries import get_job
from db.rollouts import check_guard
from db.session import one_statement, session_scope
from db.snapshots import job_snapshot
from tasks.registry import JobKind
from tensorq.core.artifacts import ArtifactStore
from tensorq.core.backoff import backoff_delay

log = logging.getLogger(__name__)

Republish = Callable[[Job, float], None]


def finished_info(jobs: list[Job], outcomes: list[Outcome], written: set[uuid.UUID]) -> list[dict[str, Any]]:
    """What the API needs about each finished job (sent with the job-change event): figures for
    its histograms, and whether a webhook is due."""
    by_id = {job.id: job for job in jobs}
    now = utcnow()
    info = []
    for o in outcomes:
        job = by_id.get(o.job_id)
        if job is None or o.job_id not in written or job.started_at is None:
            continue
        info.append(
            {
                "kind": job.kind,
                "status": o.status.value,
                "queue_s": (job.started_at - job.created_at).total_seconds(),
                "run_s": (now - job.started_at).total_seconds(),
                "webhook": job.webhook_url is not None,
            }
        )
    return info


class Committer:
    def __init__(self, database_url: str, store: ArtifactStore, republish: Republish | None) -> None:
        self.database_url = database_url
        self.store = store
        # Sends a released job's message again after a delay (wired to Celery by worker/celery_app).
        self.republish = republish

    def commit(
        self, kind: JobKind[Any, Any], outcomes: list[Outcome], tenants: dict[uuid.UUID, str]
    ) -> tuple[list[Outcome], set[uuid.UUID], list[dict[str, Any]]]:
        """Final states (and model versions) in one transaction: the outcomes as written, their ids,
        and a lone job's row as committed (a snapshot for its finished event; none for a batch)."""
        plain = not kind.registers_model and not kind.records_evaluation
        if plain and outcomes and all(o.status != JobStatus.QUEUED for o in outcomes):
            # An inference batch or a lone job: the finish is one UPDATE, sent as one round trip.
            with one_statement(self.database_url) as session:
                if len(outcomes) > 1:
                    return outcomes, finish_jobs(session, outcomes), []
                row = finish_job(session, outcomes[0])
            if row is None:  # no longer held: its claim was lost
                return outcomes, set(), []
            return outcomes, {outcomes[0].job_id}, [job_snapshot(row)]
        with session_scope(self.database_url) as session:
            requeued: list[uuid.UUID] = []
            gave_up: list[Outcome] = []  # released, but out of attempts: failed, final like the rest
            for o in (o for o in outcomes if o.status == JobStatus.QUEUED):
                state = release_job(
                    session,
                    o.job_id,
                    o.claim_token,
                    error_type=o.error_type or "",
                    message=o.error_message or "",
                )
                if state == JobStatus.QUEUED:
                    requeued.append(o.job_id)
                elif state == JobStatus.FAILED:
                    message = no_attempts_left(o.error_message or "")
                    gave_up.append(dataclasses.replace(o, status=state, error_message=message))
            outcomes = [o for o in outcomes if o.status != JobStatus.QUEUED]
            if kind.registers_model:
                outcomes = [self.register_model(session, o, tenants[o.job_id]) for o in outcomes]
            if kind.records_evaluation:
                for o in outcomes:
                    self.record_evaluation(session, o, tenants[o.job_id])
            rows: list[dict[str, Any]] = []
            if len(outcomes) == 1:
                row = finish_job(session, outcomes[0])
                written = set() if row is None else {outcomes[0].job_id}
                rows = [] if row is None else [job_snapshot(row)]
            else:
                written = finish_jobs(session, outcomes)
            if (kind.registers_model or kind.records_evaluation) and len(written) < len(outcomes):
                session.rollback()  # no model version (nor evaluation) for a job whose claim was lost
                return outcomes, set(), []
        self.publish_released(requeued)
        return outcomes + gave_up, written | {o.job_id for o in gave_up}, rows

    def register_model(self, session: Session, outcome: Outcome, tenant: str) -> Outcome:
        """Register a job's output as the next version of its model, in the job's transaction.

        The result names it (`model`, `artifact_dir`, `metrics`, optionally `labels`, `task`,
        `parent` {name, version} and `lineage`); `artifact_dir` becomes `artifact`, and `version` is set."""
        if outcome.status != JobStatus.SUCCEEDED or outcome.result is None:
            return outcome
        result = dict(outcome.result)
        artifact = self.store.relative(Path(result.pop("artifact_dir")))
        parent = result.get("parent")
        version = registry.register_version(
            session,
            tenant=tenant,
            name=result["model"],
            artifact_path=artifact,
            labels=result.get("labels") or [],
            metrics=result["metrics"],
            job_id=outcome.job_id,
            task=result.get("task") or TEXT_CLASSIFIER,
            parent=(parent["name"], int(parent["version"]))
            if isinstance(parent, dict) and parent.get("version")
            else None,
            lineage=result.get("lineage"),
        )
        return dataclasses.replace(
            outcome, result={**result, "version": version.version, "artifact": artifact}
        )

    def record_evaluation(self, session: Session, outcome: Outcome, tenant: str) -> None:
        """Keep an `evaluate` job's figures on the version it measured (`result["evaluation"]`:
        model, version, dataset_id, split, metrics, device); the shipped model has no version row."""
        evaluation = (
            (outcome.result or {}).get("evaluation") if outcome.status == JobStatus.SUCCEEDED else None
        )
        if not isinstance(evaluation, dict):
            return
        version = registry.find_version(session, tenant, evaluation["model"], int(evaluation["version"]))
        if version is None:
            return
        registry.record_evaluation(
            session,
            version,
            dataset_id=str(evaluation["dataset_id"]),
            split=str(evaluation["split"]),
            metrics=evaluation["metrics"],
            device=str(evaluation["device"]),
            job_id=outcome.job_id,
        )

    def check_guards(self, jobs: list[Job], outcomes: list[Outcome], written: set[uuid.UUID]) -> None:
        """After jobs assigned through an alias failed: let the alias's guard judge their versions
        (only failures can raise a failure rate). Advisory: an error here is logged, not raised."""
        by_id = {job.id: job for job in jobs}
        failed = {
            (job.tenant, job.model, job.model_version)
            for o in outcomes
            if o.status == JobStatus.FAILED and o.job_id in written
            and (job := by_id.get(o.job_id)) is not None and job.model is not None and "@" in job.model
            and job.model_version is not None
        }  # fmt: skip
        for tenant, ref, version in sorted(failed):
            assert ref is not None and version is not None
            try:
                with session_scope(self.database_url) as session:
                    rolled = check_guard(session, tenant, ref, version)
            except Exception:
                log.warning("guard check of %s version %s failed", ref, version, exc_info=True)
                continue
            if rolled is not None:
                log.warning(
                    "%s: version %d tripped the alias's guard; rolled back to %s",
                    ref,
                    version,
                    rolled.split or {str(rolled.version): 100},
                )

    def publish_released(self, job_ids: list[uuid.UUID]) -> None:
        """Jobs given back after a transient error go out again after an exponential, jittered delay."""
        if not job_ids or self.republish is None:
            return
        with session_scope(self.database_url) as session:
            jobs = [
                j
                for j in (get_job(session, i) for i in job_ids)
                if j is not None and j.status == JobStatus.QUEUED
            ]
        for job in jobs:
            self.republish(job, backoff_delay(job.attempts, base=1.0, cap=60.0))

    def clean_work_dirs(self, outcomes: list[Outcome]) -> None:
        """A finished job's checkpoints go; only the model a registry version points at stays."""
        for outcome in outcomes:
            work_dir = self.store.job_dir(outcome.job_id)
            if not work_dir.exists():
                continue
            artifact = (outcome.result or {}).get("artifact")
            keep = self.store.path(artifact) if isinstance(artifact, str) else None
            for entry in work_dir.iterdir():
                if keep is None or not keep.is_relative_to(entry):
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
            if keep is None:
                shutil.rmtree(work_dir, ignore_errors=True)
