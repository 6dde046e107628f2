from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Path
from sqlalchemy.orm import Session

from api.auth import UNAUTHORIZED, current_principal
from api.deps import get_session
from api.schemas import AliasIn, AliasOut, ErrorOut, ModelList, ModelOut, ModelVersionOut
from db.models import Model
from db.registry import NAME, RegistryError, aliases_of, get_model, list_models, set_alias, versions_of
from db.tenants import Principal

router = APIRouter(
    prefix="/v1/models", tags=["models"], dependencies=[Depends(current_principal)], responses=UNAUTHORIZED
)


def name_param() -> Any:
    # A fresh Path() per parameter: FastAPI binds a shared FieldInfo to one parameter name only.
    return Path(pattern=f"^{NAME}$", description="Lowercase letters, digits, '-' and '_'")


def model_out(session: Session, model: Model) -> ModelOut:
    versions = versions_of(session, model)
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


@router.put(
    "/{name}/aliases/{alias}",
    response_model=AliasOut,
    responses={404: {"model": ErrorOut, "description": "No such model or version"}},
    summary="Point an alias (e.g. production) at a version",
)
def move_alias(
    body: AliasIn,
    name: str = name_param(),
    alias: str = name_param(),
    session: Session = Depends(get_session),
    principal: Principal = Depends(current_principal),
) -> AliasOut:
    try:
        row = set_alias(session, principal.tenant, name, alias, body.version)
    except RegistryError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    session.commit()
    return AliasOut(model=name, alias=alias, version=row.version)
