"""Datasets and the model registry: names, auto-incremented versions, movable aliases."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db.models import TEXT_CLASSIFIER, Dataset, Model, ModelAlias, ModelEvaluation, ModelVersion, utcnow

NAME = r"[a-z0-9][a-z0-9_-]{0,62}"
NAME_RE = re.compile(rf"^{NAME}$")
REF_RE = re.compile(rf"^(?P<name>{NAME})(?::(?P<version>[1-9][0-9]{{0,8}})|@(?P<alias>{NAME}))?$")


class RegistryError(LookupError):
    pass


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int | None = None
    alias: str | None = None


def parse_ref(ref: str) -> ModelRef:
    """`name` (latest), `name:3` or `name@production`."""
    match = REF_RE.match(ref)
    if match is None:
        raise ValueError(f"not a model reference: {ref!r} (use name, name:3 or name@alias)")
    version = match["version"]
    return ModelRef(match["name"], int(version) if version else None, match["alias"])


def create_dataset(
    session: Session,
    *,
    tenant: str,
    dataset_id: uuid.UUID,
    name: str | None,
    path: str,
    rows: int,
    labels: list[str],
    sha256: str,
    size_bytes: int,
    labelled: bool = True,
) -> Dataset:
    dataset = Dataset(
        id=dataset_id,
        tenant=tenant,
        name=name,
        path=path,
        rows=rows,
        labels=labels,
        sha256=sha256,
        size_bytes=size_bytes,
        created_at=utcnow(),
        labelled=labelled,
    )
    session.add(dataset)
    return dataset


def dataset_usage(session: Session, tenant: str) -> tuple[int, int]:
    """(stored datasets, their bytes) of one tenant, for its quotas."""
    count, size = session.execute(
        select(func.count(), func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.tenant == tenant)
    ).one()
    return int(count), int(size)


def get_dataset(session: Session, dataset_id: uuid.UUID, tenant: str) -> Dataset | None:
    """The tenant's dataset; another tenant's is as absent as a missing one."""
    dataset = session.get(Dataset, dataset_id)
    return dataset if dataset is not None and dataset.tenant == tenant else None


def list_datasets(session: Session, tenant: str, limit: int = 100) -> list[Dataset]:
    stmt = select(Dataset).where(Dataset.tenant == tenant).order_by(Dataset.created_at.desc()).limit(limit)
    return list(session.scalars(stmt))


def _ensure_model(session: Session, tenant: str, name: str) -> Model:
    if not NAME_RE.match(name):
        raise ValueError(f"not a model name: {name!r}")
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(
        insert(Model)
        .values(tenant=tenant, name=name, created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["tenant", "name"])
    )
    # The row lock serialises concurrent registrations of one name, so versions never collide.
    stmt = select(Model).where(Model.tenant == tenant, Model.name == name).with_for_update()
    return session.scalars(stmt).one()


def register_version(
    session: Session,
    *,
    tenant: str,
    name: str,
    artifact_path: str,
    labels: list[str],
    metrics: dict[str, Any],
    job_id: uuid.UUID | None,
    task: str = TEXT_CLASSIFIER,
    parent: tuple[str, int] | None = None,
    lineage: dict[str, Any] | None = None,
) -> ModelVersion:
    """The model's next version (the model is created with its first). `parent` is the registered
    version it was made from, `lineage` how (method, options, comparison)."""
    model = _ensure_model(session, tenant, name)
    latest = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model.id))
    version = ModelVersion(
        model_id=model.id,
        version=(latest or 0) + 1,
        artifact_path=artifact_path,
        labels=labels,
        metrics=metrics,
        job_id=job_id,
        created_at=utcnow(),
        task=task,
        parent_name=parent[0] if parent else None,
        parent_version=parent[1] if parent else None,
        lineage=lineage,
    )
    session.add(version)
    session.flush()
    return version


def find_version(session: Session, tenant: str, name: str, version: int) -> ModelVersion | None:
    stmt = (
        select(ModelVersion)
        .join(Model, Model.id == ModelVersion.model_id)
        .where(Model.tenant == tenant, Model.name == name, ModelVersion.version == version)
    )
    return session.scalars(stmt).one_or_none()


def record_evaluation(
    session: Session,
    version: ModelVersion,
    *,
    dataset_id: str,
    split: str,
    metrics: dict[str, Any],
    device: str,
    job_id: uuid.UUID | None,
) -> ModelEvaluation:
    row = ModelEvaluation(
        model_version_id=version.id,
        dataset_id=dataset_id,
        split=split,
        metrics=metrics,
        device=device,
        job_id=job_id,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row


def evaluations_of(session: Session, versions: list[ModelVersion]) -> dict[int, list[ModelEvaluation]]:
    """Each version's evaluations, oldest first, by version id."""
    found: dict[int, list[ModelEvaluation]] = {v.id: [] for v in versions}
    if not found:
        return found
    stmt = (
        select(ModelEvaluation)
        .where(ModelEvaluation.model_version_id.in_(found))
        .order_by(ModelEvaluation.model_version_id, ModelEvaluation.id)
    )
    for row in session.scalars(stmt):
        found[row.model_version_id].append(row)
    return found


def get_model(session: Session, tenant: str, name: str) -> Model | None:
    return session.scalars(select(Model).where(Model.tenant == tenant, Model.name == name)).one_or_none()


def list_models(session: Session, tenant: str) -> list[Model]:
    return list(session.scalars(select(Model).where(Model.tenant == tenant).order_by(Model.name)))


def versions_of(session: Session, model: Model) -> list[ModelVersion]:
    stmt = select(ModelVersion).where(ModelVersion.model_id == model.id).order_by(ModelVersion.version)
    return list(session.scalars(stmt))


def aliases_of(session: Session, model: Model) -> dict[str, int]:
    """alias -> its version (a split's baseline)."""
    rows = session.scalars(select(ModelAlias).where(ModelAlias.model_id == model.id))
    return {a.alias: a.version for a in rows}


def resolve(session: Session, tenant: str, ref: str) -> ModelVersion:
    """The version a reference names in the tenant's registry; RegistryError if there is none."""
    parsed = parse_ref(ref)
    model = get_model(session, tenant, parsed.name)
    if model is None:
        raise RegistryError(f"no model named {parsed.name!r}")
    version = parsed.version
    if parsed.alias is not None:
        alias = session.get(ModelAlias, (model.id, parsed.alias))
        if alias is None:
            raise RegistryError(f"model {parsed.name!r} has no alias {parsed.alias!r}")
        version = alias.version  # a split's baseline; jobs are assigned theirs (db.rollouts.assign)
    stmt = select(ModelVersion).where(ModelVersion.model_id == model.id)
    stmt = (
        stmt.where(ModelVersion.version == version) if version else stmt.order_by(ModelVersion.version.desc())
    )
    found = session.scalars(stmt.limit(1)).first()
    if found is None:
        raise RegistryError(f"model {parsed.name!r} has no version {version}")
    return found


def set_alias(
    session: Session, tenant: str, name: str, alias: str, version: int, *, key_id: uuid.UUID | None = None
) -> ModelAlias:
    """Point the alias at one version (a split, shadow or guard: `db.rollouts.set_assignment`),
    with a row of history. RegistryError when the model or the version does not exist."""
    from db.rollouts import Assignment, AssignmentError, set_assignment  # rollouts builds on this module

    try:
        return set_assignment(session, tenant, name, alias, Assignment.single(version), key_id=key_id)
    except AssignmentError as exc:
        raise RegistryError(exc.message) from None
