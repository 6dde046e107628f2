"""Key management and the tenant's webhook secret, for admin keys; `whoami` for any key."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from api.auth import UNAUTHORIZED, admin_principal, current_principal
from api.deps import get_session, get_settings
from api.keycache import KeyCache
from api.schemas import ErrorOut, KeyCreate, KeyCreated, KeyList, KeyOut, WebhookSecretOut
from db.models import ApiKey
from db.queries import count_active_jobs
from db.registry import dataset_usage
from db.tenants import (
    Principal,
    create_key,
    find_key,
    list_keys,
    revoke_key,
    rotate_webhook_secret,
    webhook_secret,
)
from tensorq.core.settings import Settings

router = APIRouter(
    prefix="/v1", tags=["tenant"], dependencies=[Depends(current_principal)], responses=UNAUTHORIZED
)

ADMIN_ONLY: dict[int | str, dict[str, object]] = {
    403: {"model": ErrorOut, "description": "Needs an admin key"}
}


class Limits(BaseModel):
    max_active_jobs: int
    submit_rate_per_second: float
    submit_burst: int
    max_batch_jobs: int
    max_texts_per_job: int
    max_datasets: int = Field(description="TENSORQ_TENANT_MAX_DATASETS")
    max_dataset_bytes: int = Field(description="TENSORQ_TENANT_MAX_DATASET_BYTES, all datasets together")
    max_upload_bytes: int = Field(description="TENSORQ_DATASET_MAX_BYTES, one upload")
    max_body_bytes: int = Field(description="TENSORQ_MAX_BODY_BYTES, any other request")
    list_max_bytes: int = Field(description="TENSORQ_LIST_MAX_BYTES, one page of GET /v1/jobs")


class Usage(BaseModel):
    active_jobs: int = Field(description="Queued or running")
    datasets: int
    dataset_bytes: int


class WhoAmI(BaseModel):
    tenant: str
    key_id: uuid.UUID
    admin: bool
    limits: Limits = Field(description="What this server allows the tenant")
    usage: Usage = Field(description="What the tenant uses of them now")


def key_out(row: ApiKey) -> KeyOut:
    return KeyOut(
        id=row.id,
        tenant=row.tenant,
        prefix=row.prefix,
        admin=row.admin,
        label=row.label,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


@router.get("/whoami", response_model=WhoAmI, summary="The caller's tenant, key and limits")
def whoami(
    principal: Principal = Depends(current_principal),
    settings: Settings = Depends(get_settings),
    session: Session = Depends(get_session),
) -> WhoAmI:
    s = settings
    datasets, dataset_bytes = dataset_usage(session, principal.tenant)
    return WhoAmI(
        tenant=principal.tenant,
        key_id=principal.key_id,
        admin=principal.admin,
        limits=Limits(
            max_active_jobs=s.tenant_max_active_jobs,
            submit_rate_per_second=s.tenant_submit_rate,
            submit_burst=s.tenant_submit_burst,
            max_batch_jobs=s.max_batch_jobs,
            max_texts_per_job=s.max_texts_per_job,
            max_datasets=s.tenant_max_datasets,
            max_dataset_bytes=s.tenant_max_dataset_bytes,
            max_upload_bytes=s.dataset_max_bytes,
            max_body_bytes=s.max_body_bytes,
            list_max_bytes=s.list_max_bytes,
        ),
        usage=Usage(
            active_jobs=count_active_jobs(session, principal.tenant),
            datasets=datasets,
            dataset_bytes=dataset_bytes,
        ),
    )


@router.get("/keys", response_model=KeyList, responses=ADMIN_ONLY, summary="The tenant's API keys")
def read_keys(
    principal: Principal = Depends(admin_principal), session: Session = Depends(get_session)
) -> KeyList:
    return KeyList(items=[key_out(k) for k in list_keys(session, principal.tenant)])


@router.post(
    "/keys",
    status_code=201,
    response_model=KeyCreated,
    responses=ADMIN_ONLY,
    summary="A new key for the tenant",
)
def new_key(
    body: KeyCreate, principal: Principal = Depends(admin_principal), session: Session = Depends(get_session)
) -> KeyCreated:
    row, key = create_key(session, principal.tenant, admin=body.admin, label=body.label)
    session.commit()
    return KeyCreated(**key_out(row).model_dump(), key=key)


@router.post(
    "/keys/{key_id}/revoke",
    response_model=KeyOut,
    responses={**ADMIN_ONLY, 404: {"model": ErrorOut}},
    summary="Revoke a key; it stops working at once",
)
def revoke(
    request: Request,
    key_id: uuid.UUID,
    principal: Principal = Depends(admin_principal),
    session: Session = Depends(get_session),
) -> KeyOut:
    row = find_key(session, str(key_id), principal.tenant)
    if row is None:
        raise HTTPException(status_code=404, detail="key not found")
    revoke_key(session, row)
    session.commit()
    # Out of this process's key cache before the answer, and out of the others' via Redis.
    cache: KeyCache | None = getattr(request.app.state, "key_cache", None)
    if cache is not None:
        cache.revoked(row.id)
    return key_out(row)


def secret_out(session: Session, tenant: str, *, rotate: bool) -> WebhookSecretOut:
    secret = rotate_webhook_secret(session, tenant) if rotate else webhook_secret(session, tenant)
    session.commit()
    return WebhookSecretOut(tenant=tenant, webhook_secret=secret)


@router.get(
    "/webhook-secret",
    response_model=WebhookSecretOut,
    responses=ADMIN_ONLY,
    summary="The tenant's webhook secret",
)
def read_webhook_secret(
    principal: Principal = Depends(admin_principal), session: Session = Depends(get_session)
) -> WebhookSecretOut:
    return secret_out(session, principal.tenant, rotate=False)


@router.post(
    "/webhook-secret:rotate",
    response_model=WebhookSecretOut,
    responses=ADMIN_ONLY,
    summary="Replace the tenant's webhook secret (deliveries from now on use the new one)",
)
def rotate(
    principal: Principal = Depends(admin_principal), session: Session = Depends(get_session)
) -> WebhookSecretOut:
    return secret_out(session, principal.tenant, rotate=True)
