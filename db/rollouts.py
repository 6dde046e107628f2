"""Gradual rollouts behind a model alias: splits, shadows, guards, history and statistics.

An alias's assignment is a split of its jobs between up to four versions by integer percentage
(one version is the split {v: 100}), optionally a shadow version that a share of the jobs also
runs on, and optionally a guard. A job naming `name@alias` is assigned one version at submission,
deterministically from its id (`pick`), and keeps it through retries (`jobs.model_version`).

The baseline is the split's largest share (the lower version on a tie); every other version in
the split is a candidate. A guard rolls the alias back to its previous assignment when a
candidate's failure rate, over at least `min_jobs` jobs assigned since the split was set, is above
`max_failure_rate`. Every change is a row of history; a rollback is conditional on the alias's
revision, so two checkers that trip at once roll it back once.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from db.models import AliasChange, Job, JobStatus, Model, ModelAlias, ModelVersion, ShadowRun, utcnow
from db.registry import NAME_RE, RegistryError, get_model, parse_ref
from db.sealing import Unreadable, open_column

MAX_SPLIT_VERSIONS = 4
# Finished jobs per version whose run times and labels the statistics read (newest first).
STATS_SAMPLE = 500
HISTORY_LIMIT = 50


class AssignmentError(ValueError):
    """An assignment that cannot be made; `loc` names the field (for a 422)."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


class NothingToRollBack(LookupError):
    pass


@dataclass(frozen=True)
class Guard:
    max_failure_rate: float
    min_jobs: int


@dataclass(frozen=True)
class Assignment:
    split: dict[int, int]  # version -> percent, summing to 100
    shadow: tuple[int, int] | None = None  # (version, percent)
    guard: Guard | None = None

    @classmethod
    def single(cls, version: int) -> Assignment:
        return cls({version: 100})

    @property
    def baseline(self) -> int:
        return min(self.split, key=lambda v: (-self.split[v], v))

    @property
    def candidates(self) -> list[int]:
        return sorted(v for v in self.split if v != self.baseline)

    def pick(self, job_id: uuid.UUID) -> tuple[int, int | None]:
        """The version a job runs on, and its shadow version if it is shadowed: by its id, so
        the same job is always assigned the same way (independent draws for split and shadow)."""
        point, cumulative = _bucket(job_id, b"split"), 0
        chosen = max(self.split)
        for version in sorted(self.split):
            cumulative += self.split[version]
            if point < cumulative:
                chosen = version
                break
        shadow = None
        if self.shadow is not None and _bucket(job_id, b"shadow") < self.shadow[1]:
            shadow = self.shadow[0]
        return chosen, shadow

    def to_json(self) -> dict[str, Any]:
        return {
            "split": {str(v): p for v, p in sorted(self.split.items())},
            "shadow": None if self.shadow is None else {"version": self.shadow[0], "percent": self.shadow[1]},
            "guard": None
            if self.guard is None
            else {"max_failure_rate": self.guard.max_failure_rate, "min_jobs": self.guard.min_jobs},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Assignment:
        shadow, guard = data.get("shadow"), data.get("guard")
        return cls(
            {int(v): int(p) for v, p in data["split"].items()},
            None if shadow is None else (int(shadow["version"]), int(shadow["percent"])),
            None if guard is None else Guard(float(guard["max_failure_rate"]), int(guard["min_jobs"])),
        )


def _bucket(job_id: uuid.UUID, salt: bytes) -> int:
    """0-99, uniform over job ids, from a hash (not the id's own bits, which need not be random)."""
    digest = hashlib.sha256(salt + job_id.bytes).digest()
    return int.from_bytes(digest[:8], "big") % 100


def assignment_of(row: ModelAlias) -> Assignment:
    split = row.split or {str(row.version): 100}
    return Assignment.from_json({"split": split, "shadow": row.shadow, "guard": row.guard})


def _alias_row(session: Session, model: Model, alias: str, *, for_update: bool = False) -> ModelAlias | None:
    stmt = select(ModelAlias).where(ModelAlias.model_id == model.id, ModelAlias.alias == alias)
    if for_update:
        stmt = stmt.with_for_update()
    return session.scalars(stmt.execution_options(populate_existing=True)).one_or_none()


def _model(session: Session, tenant: str, name: str) -> Model:
    model = get_model(session, tenant, name)
    if model is None:
        raise RegistryError(f"no model named {name!r}")
    return model


def _check_versions(session: Session, model: Model, assignment: Assignment) -> None:
    """Every version named is registered; the shadow is not one of the split's."""
    registered = set(session.scalars(select(ModelVersion.version).where(ModelVersion.model_id == model.id)))
    for version in sorted(assignment.split):
        if version not in registered:
            raise AssignmentError(("split", str(version)), f"model {model.name!r} has no version {version}")
    if assignment.shadow is not None:
        version = assignment.shadow[0]
        if version in assignment.split:
            raise AssignmentError(("shadow", "version"), f"the shadow version {version} is in the split")
        if version not in registered:
            raise AssignmentError(("shadow", "version"), f"model {model.name!r} has no version {version}")


def _write(row: ModelAlias, assignment: Assignment, now: datetime) -> None:
    row.version = assignment.baseline
    row.split = None if len(assignment.split) == 1 else assignment.to_json()["split"]
    row.shadow = assignment.to_json()["shadow"]
    row.guard = assignment.to_json()["guard"]
    row.updated_at = now


def set_assignment(
    session: Session,
    tenant: str,
    name: str,
    alias: str,
    assignment: Assignment,
    *,
    key_id: uuid.UUID | None = None,
    reason: str | None = None,
) -> ModelAlias:
    """Point the alias at `assignment`, in the caller's transaction, with a row of history.
    RegistryError: no such model; AssignmentError: a version is not registered (nothing changed)."""
    if not NAME_RE.match(alias):
        raise ValueError(f"not an alias name: {alias!r}")
    if len(assignment.split) > MAX_SPLIT_VERSIONS or sum(assignment.split.values()) != 100:
        raise AssignmentError(
            ("split",), f"at most {MAX_SPLIT_VERSIONS} versions, percentages summing to 100"
        )
    model = _model(session, tenant, name)
    _check_versions(session, model, assignment)
    now = utcnow()
    row = _alias_row(session, model, alias, for_update=True)
    before = None if row is None else assignment_of(row).to_json()
    if row is None:
        row = ModelAlias(model_id=model.id, alias=alias, revision=1)
        _write(row, assignment, now)
        session.add(row)
    else:
        _write(row, assignment, now)
        row.revision += 1
    session.flush()
    session.add(
        AliasChange(
            model_id=model.id,
            alias=alias,
            action="set",
            from_assignment=before,
            to_assignment=assignment.to_json(),
            key_id=key_id,
            reason=reason,
            revision=row.revision,
            created_at=now,
        )
    )
    session.flush()
    return row


def rollback(
    session: Session,
    tenant: str,
    name: str,
    alias: str,
    *,
    key_id: uuid.UUID | None,
    reason: str,
    action: str = "rollback",
    seen_revision: int | None = None,
) -> ModelAlias | None:
    """Restore the assignment before the current one (a second rollback undoes the first).

    Conditional on the alias's revision (`seen_revision`, or the one read here): None when another
    change landed first, so two checkers that trip together roll back once. RegistryError: no
    model or alias; NothingToRollBack: the alias has had one assignment only."""
    model = _model(session, tenant, name)
    row = _alias_row(session, model, alias)
    if row is None:
        raise RegistryError(f"model {name!r} has no alias {alias!r}")
    revision = row.revision if seen_revision is None else seen_revision
    last = session.scalars(
        select(AliasChange)
        .where(AliasChange.model_id == model.id, AliasChange.alias == alias)
        .order_by(AliasChange.id.desc())
        .limit(1)
    ).first()
    if last is None or last.from_assignment is None:
        raise NothingToRollBack(f"alias {alias!r} of {name!r} has no earlier assignment to restore")
    current = assignment_of(row).to_json()
    previous = Assignment.from_json(last.from_assignment)
    staged = ModelAlias()
    now = utcnow()
    _write(staged, previous, now)
    res = session.execute(
        update(ModelAlias)
        .where(ModelAlias.model_id == model.id, ModelAlias.alias == alias, ModelAlias.revision == revision)
        .values(
            version=staged.version,
            split=staged.split,
            shadow=staged.shadow,
            guard=staged.guard,
            revision=revision + 1,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if not res.rowcount:  # type: ignore[attr-defined]
        return None
    session.add(
        AliasChange(
            model_id=model.id,
            alias=alias,
            action=action,
            from_assignment=current,
            to_assignment=previous.to_json(),
            key_id=key_id,
            reason=reason,
            revision=revision + 1,
            created_at=now,
        )
    )
    session.flush()
    return _alias_row(session, model, alias)


def assign(
    session: Session, tenant: str, ref: str | None, job_id: uuid.UUID
) -> tuple[int | None, int | None]:
    """(model_version, shadow_version) for a new job naming `ref` in the tenant's registry:
    by the alias's split for `name@alias`, the number for `name:3`, (None, None) otherwise (the
    latest version, resolved when it runs; or no such model or alias, which the job reports).
    An alias is read once per session (one request's jobs are assigned by the same split)."""
    if ref is None:
        return None, None
    try:
        parsed = parse_ref(ref)
    except ValueError:
        return None, None
    if parsed.version is not None:
        return parsed.version, None
    if parsed.alias is None:
        return None, None
    cache: dict[tuple[str, str, str], Assignment | None] = session.info.setdefault("tensorq.aliases", {})
    key = (tenant, parsed.name, parsed.alias)
    if key not in cache:
        model = get_model(session, tenant, parsed.name)
        row = None if model is None else _alias_row(session, model, parsed.alias)
        cache[key] = None if row is None else assignment_of(row)
    assignment = cache[key]
    return (None, None) if assignment is None else assignment.pick(job_id)


def check_guard(session: Session, tenant: str, ref: str, version: int) -> ModelAlias | None:
    """After a job of `version` failed: roll the alias back if its guard trips on that version.
    The alias as rolled back, or None (no guard, not a candidate, within limits, or another
    checker rolled it back first). Two indexed reads when a guard is set, one when none is."""
    try:
        parsed = parse_ref(ref)
    except ValueError:
        return None
    if parsed.alias is None:
        return None
    model = get_model(session, tenant, parsed.name)
    row = None if model is None else _alias_row(session, model, parsed.alias)
    if row is None or row.guard is None:
        return None
    assignment = assignment_of(row)
    if assignment.guard is None or version not in assignment.candidates:
        return None
    finished, failed = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((Job.status == JobStatus.FAILED, 1), else_=0)), 0),
        ).where(
            Job.tenant == tenant,
            Job.model == ref,
            Job.model_version == version,
            Job.created_at >= row.updated_at,
            Job.status.in_((JobStatus.SUCCEEDED, JobStatus.FAILED)),
        )
    ).one()
    guard = assignment.guard
    if finished < guard.min_jobs or failed / finished <= guard.max_failure_rate:
        return None
    reason = (
        f"guard: version {version} failed {failed} of {finished} jobs ({failed / finished:.1%}) since "
        f"the split was set, over max_failure_rate {guard.max_failure_rate:g} (min_jobs {guard.min_jobs})"
    )
    try:
        return rollback(
            session,
            tenant,
            parsed.name,
            parsed.alias,
            key_id=None,
            reason=reason,
            action="auto-rollback",
            seen_revision=row.revision,
        )
    except NothingToRollBack:
        # A split set on a new alias: roll back to its baseline alone.
        return _guard_to_baseline(session, model, row, assignment, reason)  # type: ignore[arg-type]


def _guard_to_baseline(
    session: Session, model: Model, row: ModelAlias, assignment: Assignment, reason: str
) -> ModelAlias | None:
    now = utcnow()
    baseline = Assignment.single(assignment.baseline)
    res = session.execute(
        update(ModelAlias)
        .where(
            ModelAlias.model_id == model.id,
            ModelAlias.alias == row.alias,
            ModelAlias.revision == row.revision,
        )
        .values(
            version=baseline.baseline,
            split=None,
            shadow=None,
            guard=None,
            revision=row.revision + 1,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if not res.rowcount:  # type: ignore[attr-defined]
        return None
    session.add(
        AliasChange(
            model_id=model.id,
            alias=row.alias,
            action="auto-rollback",
            from_assignment=assignment.to_json(),
            to_assignment=baseline.to_json(),
            key_id=None,
            reason=f"{reason}; no earlier assignment: the baseline {baseline.baseline} alone",
            revision=row.revision + 1,
            created_at=now,
        )
    )
    session.flush()
    return _alias_row(session, model, row.alias)


def record_shadow(session: Session, run: ShadowRun) -> None:
    """One shadow outcome per job (a redelivered message's second run changes nothing)."""
    if session.get(ShadowRun, run.job_id) is None:
        session.add(run)


def history(session: Session, model: Model, alias: str, limit: int = HISTORY_LIMIT) -> list[AliasChange]:
    stmt = (
        select(AliasChange)
        .where(AliasChange.model_id == model.id, AliasChange.alias == alias)
        .order_by(AliasChange.id.desc())
        .limit(limit)
    )
    return list(session.scalars(stmt))


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))], 3)


def version_stats(
    session: Session, tenant: str, ref: str, versions: list[int], window_seconds: float
) -> list[dict[str, Any]]:
    """Per version, over jobs naming `ref` created in the last `window_seconds`: jobs by status,
    failure rate, p50/p95 run time (started to finished, over the newest STATS_SAMPLE finished),
    the top labels predicted (same sample) and, for shadow versions, runs and agreement."""
    since = utcnow() - timedelta(seconds=window_seconds)
    scope = (Job.tenant == tenant, Job.model == ref, Job.created_at >= since)
    counts: dict[int, Counter[str]] = {}
    for version, status, n in session.execute(
        select(Job.model_version, Job.status, func.count())
        .where(*scope)
        .group_by(Job.model_version, Job.status)
    ):
        if version is not None:
            counts.setdefault(version, Counter())[JobStatus(status).value] += int(n)
    shadows: dict[int, tuple[int, int, float | None]] = {}
    for version, runs, ok, agreement in session.execute(
        select(
            ShadowRun.version,
            func.count(),
            func.sum(case((ShadowRun.ok.is_(True), 1), else_=0)),
            func.avg(ShadowRun.agreement),
        )
        .where(ShadowRun.tenant == tenant, ShadowRun.model == ref, ShadowRun.created_at >= since)
        .group_by(ShadowRun.version)
    ):
        shadows[version] = (int(runs), int(ok or 0), None if agreement is None else float(agreement))
    out = []
    for version in sorted(set(versions) | set(counts) | set(shadows)):
        c = counts.get(version, Counter())
        run_ms: list[float] = []
        labels: Counter[str] = Counter()
        if c["succeeded"] or c["failed"]:
            sample = session.execute(
                select(Job.id, Job.started_at, Job.finished_at, Job.result)
                .where(*scope, Job.model_version == version, Job.status == JobStatus.SUCCEEDED)
                .order_by(Job.created_at.desc())
                .limit(STATS_SAMPLE)
            )
            for job_id, started, finished, sealed in sample:
                result = open_column(session.get_bind(), Job, tenant, job_id, "result", sealed)
                if isinstance(result, Unreadable):
                    continue
                if started is not None and finished is not None:
                    run_ms.append((finished - started).total_seconds() * 1000)
                for prediction in (result or {}).get("predictions", []) or []:
                    if isinstance(prediction, dict) and isinstance(prediction.get("label"), str):
                        labels[prediction["label"]] += 1
        done = c["succeeded"] + c["failed"]
        shadow = shadows.get(version)
        out.append(
            {
                "version": version,
                "jobs": sum(c.values()),
                "by_status": dict(sorted(c.items())),
                "failure_rate": None if not done else round(c["failed"] / done, 4),
                "run_ms": {
                    "p50": _percentile(run_ms, 0.5),
                    "p95": _percentile(run_ms, 0.95),
                    "sample": len(run_ms),
                },
                "labels": dict(labels.most_common(20)),
                "shadow": None
                if shadow is None
                else {"runs": shadow[0], "failed": shadow[0] - shadow[1], "agreement": shadow[2]},
            }
        )
    return out
