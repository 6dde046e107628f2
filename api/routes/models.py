from __future__ import annotations

from typing import Any, NoReturn

from fastapi import APIRouter, Depends, HTTPException, Path
from fastapi.exceptions import RequestValidationError
from sqlalchemy.orm import Session

from api.auth import UNAUTHORIZED, current_principal
from api.deps import get_session, get_settings
from api.schemas import (
    AliasChangeOut,
    AliasDetailOut,
    AliasIn,
    AliasOut,
    ErrorOut,
    EvaluationOut,
    ModelList,
    ModelOut,
    ModelVersionOut,
    RollbackIn,
    VersionStatsOut,
)
from db.models import Model, ModelAlias
from db.registry import NAME, RegistryError, aliases_of, evaluations_of, get_model, list_models, versions_of
from db.rollouts import (
    Assignment,
    AssignmentError,
    Guard,
    NothingToRollBack,
    assignment_of,
    history,
    rollback,
    set_assignment,
    version_stats,
)
from db.tenants import Principal
from tensorq.core.settings import Settings

router = APIRouter(
    prefix="/v1/models", tags=["models"], dependencies=[Depends(current_principal)], responses=UNAUTHORIZED
)


def name_param() -> Any:
    # A fresh Path() per parameter: FastAPI binds a shared FieldInfo to one parameter name only.
    return Path(pattern=f"^{NAME}$", description="Lowercase letters, digits, '-' and '_'")


def model_out(session: Session, model: Model) -> ModelOut:
    versions = versions_of(session, model)
    evaluations = evaluations_of(session, versions)
    return ModelOut(
        name=model.name,
        latest_version=versions[-1].version if versions else None,
        aliases=aliases_of(session, model),
        versions=[
            ModelVersionOut(
                version=v.version,
                labels=v.labels,
                metrics=v.metrics,
                artifact=v.artifact_path,
                job_id=v.job_id,
                created_at=v.created_at,
                task=v.task,
                parent=None if v.parent_name is None else f"{v.parent_name}:{v.parent_version}",
                lineage=v.lineage,
                evaluations=[
                    EvaluationOut(
                        dataset_id=e.dataset_id,
                        split=e.split,
                        metrics=e.metrics,
                        device=e.device,
                        job_id=e.job_id,
                        created_at=e.created_at,
                    )
                    for e in evaluations[v.id]
                ],
            )
            for v in versions
        ],
        created_at=model.created_at,
    )


@router.get("", response_model=ModelList, summary="Registered models")
def read_models(
    session: Session = Depends(get_session), principal: Principal = Depends(current_principal)
) -> ModelList:
    return ModelList(items=[model_out(session, m) for m in list_models(session, principal.tenant)])


@router.get(
    "/{name}", response_model=ModelOut, responses={404: {"model": ErrorOut}}, summary="A model's versions"
)
def read_model(
    name: str = name_param(),
    session: Session = Depends(get_session),
    principal: Principal = Depends(current_principal),
) -> ModelOut:
    model = get_model(session, principal.tenant, name)
    if model is None:
        raise HTTPException(status_code=404, detail="model not found")
    return model_out(session, model)


ALIAS_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "No such model (or alias)"},
    422: {"model": ErrorOut, "description": "Invalid assignment; `detail[].loc` names the field"},
}


def assignment_from(body: AliasIn) -> Assignment:
    if body.split is not None:
        split = {int(v): p for v, p in body.split.items()}
    else:
        assert body.version is not None  # AliasIn requires one of them
        split = {body.version: 100}
    shadow = None if body.shadow is None else (body.shadow.version, body.shadow.percent)
    guard = None if body.guard is None else Guard(body.guard.max_failure_rate, body.guard.min_jobs)
    return Assignment(split, shadow, guard)


def alias_out(name: str, row: ModelAlias) -> AliasOut:
    a = assignment_of(row).to_json()
    return AliasOut(
        model=name,
        alias=row.alias,
        version=row.version,
        split=a["split"] if row.split else None,
        shadow=a["shadow"],
        guard=a["guard"],
    )


@router.put(
    "/{name}/aliases/{alias}",
    response_model=AliasOut,
    response_model_exclude_none=True,
    responses=ALIAS_RESPONSES,
    summary="Point an alias (e.g. production) at a version, or split its jobs between versions",
)
def move_alias(
    body: AliasIn,
    name: str = name_param(),
    alias: str = name_param(),
    session: Session = Depends(get_session),
    principal: Principal = Depends(current_principal),
) -> AliasOut:
    """`{"version": 3}`, or `{"split": {"3": 90, "4": 10}}` (integer percentages summing to 100,
    at most 4 versions) with an optional `"guard": {"max_failure_rate": 0.05, "min_jobs": 20}`;
    either with an optional `"shadow": {"version": 5, "percent": 20}`. Jobs submitted after the
    change are assigned by it; jobs already assigned keep their version."""
    assignment = assignment_from(body)
    if body.version is not None and assignment.shadow is not None and body.version == assignment.shadow[0]:
        invalid(("body", "shadow", "version"), "the shadow version is the alias's version")
    try:
        row = set_assignment(session, principal.tenant, name, alias, assignment, key_id=principal.key_id)
    except RegistryError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    except AssignmentError as exc:
        session.rollback()
        loc = ("version",) if body.version is not None and exc.loc[0] == "split" else exc.loc
        invalid(("body", *loc), exc.message)
    session.commit()
    return alias_out(name, row)


def invalid(loc: tuple[str | int, ...], message: str) -> NoReturn:
    raise RequestValidationError([{"loc": loc, "msg": message, "type": "value_error"}])


def find_alias(session: Session, tenant: str, name: str, alias: str) -> tuple[Model, ModelAlias]:
    model = get_model(session, tenant, name)
    row = None if model is None else session.get(ModelAlias, (model.id, alias), populate_existing=True)
    if model is None or row is None:
        raise HTTPException(status_code=404, detail="alias not found")
    return model, row


@router.get(
    "/{name}/aliases/{alias}",
    response_model=AliasDetailOut,
    responses={404: {"model": ErrorOut, "description": "No such model or alias"}},
    summary="An alias's assignment, its history, and live statistics per version",
)
def read_alias(
    name: str = name_param(),
    alias: str = name_param(),
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings),
    principal: Principal = Depends(current_principal),
) -> AliasDetailOut:
    model, row = find_alias(session, principal.tenant, name, alias)
    return alias_detail(session, principal.tenant, model, row, settings.rollout_stats_window_seconds)


def alias_detail(
    session: Session, tenant: str, model: Model, row: ModelAlias, window: float
) -> AliasDetailOut:
    assignment = assignment_of(row)
    shadow = assignment.shadow[0] if assignment.shadow else None
    listed = [*assignment.split, *([shadow] if shadow else [])]
    stats = []
    for s in version_stats(session, tenant, f"{model.name}@{row.alias}", listed, window):
        v = s["version"]
        role = (
            "baseline" if v == assignment.baseline
            else "candidate" if v in assignment.split
            else "shadow" if v == shadow
            else "other"
        )  # fmt: skip
        stats.append(VersionStatsOut(role=role, percent=assignment.split.get(v, 0), **s))
    a = assignment.to_json()
    return AliasDetailOut(
        model=model.name,
        alias=row.alias,
        version=row.version,
        split=a["split"],
        shadow=a["shadow"],
        guard=a["guard"],
        revision=row.revision,
        updated_at=row.updated_at,
        window_seconds=window,
        stats=stats,
        history=[
            AliasChangeOut(
                action=h.action,
                from_=h.from_assignment,
                to=h.to_assignment,
                at=h.created_at,
                key_id=h.key_id,
                reason=h.reason,
                revision=h.revision,
            )
            for h in history(session, model, row.alias)
        ],
    )


@router.post(
    "/{name}/aliases/{alias}/rollback",
    response_model=AliasDetailOut,
    responses={
        404: {"model": ErrorOut, "description": "No such model or alias"},
        409: {"model": ErrorOut, "description": "Nothing to roll back to, or the alias changed meanwhile"},
    },
    summary="Restore the alias's previous assignment",
)
def rollback_alias(
    body: RollbackIn | None = None,
    name: str = name_param(),
    alias: str = name_param(),
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings),
    principal: Principal = Depends(current_principal),
) -> AliasDetailOut:
    """The assignment before the current one comes back (a second rollback undoes the first);
    recorded in the history with the reason given (default "manual rollback")."""
    model, _ = find_alias(session, principal.tenant, name, alias)
    reason = (body.reason if body is not None else None) or "manual rollback"
    try:
        row = rollback(session, principal.tenant, name, alias, key_id=principal.key_id, reason=reason)
    except NothingToRollBack as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    if row is None:
        raise HTTPException(status_code=409, detail="the alias changed meanwhile; read it and try again")
    session.commit()
    return alias_detail(session, principal.tenant, model, row, settings.rollout_stats_window_seconds)
