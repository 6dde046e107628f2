from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.auth import UNAUTHORIZED, current_principal
from api.deps import get_session, get_settings
from api.files import tenant_files
from api.schemas import DatasetList, DatasetOut, ErrorOut
from db.models import Dataset
from db.registry import NAME, create_dataset, dataset_usage, get_dataset, list_datasets
from db.tenants import Principal, lock_tenant
from tasks.datasets import DatasetError, parse_jsonl
from tensorq.core.artifacts import ArtifactStore
from tensorq.core.settings import Settings

router = APIRouter(
    prefix="/v1/datasets",
    tags=["datasets"],
    dependencies=[Depends(current_principal)],
    responses=UNAUTHORIZED,
)

JSONL_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": 'JSON Lines: one {"text": "...", "label": "..."} object per line (labelled), '
        'or one {"text": "..."} per line (text-only, for pretrain-mlm); not a mix.',
        "content": {"application/x-ndjson": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def dataset_out(ds: Dataset) -> DatasetOut:
    return DatasetOut(
        id=ds.id,
        name=ds.name,
        rows=ds.rows,
        labels=ds.labels,
        labelled=ds.labelled,
        sha256=ds.sha256,
        size_bytes=ds.size_bytes,
        created_at=ds.created_at,
    )


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    openapi_extra=JSONL_BODY,
    responses={
        413: {
            "model": ErrorOut,
            "description": "Upload too large, or over the tenant's stored-dataset quota "
            "(`detail.limit` names the setting)",
        },
        422: {"model": ErrorOut, "description": "A bad line; `detail[0].loc` is ['body', 'line', N]"},
    },
    summary="Upload a text dataset (JSONL), labelled or text-only",
)
async def upload_dataset(
    request: Request,
    name: str | None = Query(default=None, pattern=f"^{NAME}$", description="An optional label"),
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings),
    principal: Principal = Depends(current_principal),
) -> DatasetOut:
    data = await request.body()
    # Parsing (most of a second for a large body), the fsync'ed write and the commit all block;
    # on the event loop they would hold up every other request of this process.
    ds = await run_in_threadpool(store_upload, session, settings, principal.tenant, name, data)
    return dataset_out(ds)


def store_upload(session: Session, settings: Settings, tenant: str, name: str | None, data: bytes) -> Dataset:
    try:
        parsed = parse_jsonl(data, max_rows=settings.dataset_max_rows)
    except DatasetError as exc:
        raise RequestValidationError(
            [{"loc": ("body", "line", exc.line), "msg": exc.message, "type": "dataset_error"}]
        ) from None
    dataset_id = uuid.uuid4()
    store = ArtifactStore(settings.artifact_dir)
    relpath = store.dataset_relpath(dataset_id)
    # Sealed with the tenant's data key before its row is locked (finding the key may write one).
    sealed = tenant_files(settings, tenant).seal_for(store.path(relpath), data)
    # Checked and inserted in one transaction holding the tenant's row: concurrent uploads of one
    # tenant take turns, so together they cannot pass the quota.
    lock_tenant(session, tenant)
    check_quota(settings, tenant, *dataset_usage(session, tenant), len(data))
    # File first, row second, so a committed dataset always has its file. Written after the
    # commit instead, a crash or full disk in between would leave a dataset whose file is missing;
    # this way the worst case is a stray file, which names nothing (as in db/retention.py).
    store.write_atomic(relpath, sealed)
    try:
        ds = create_dataset(
            session,
            tenant=tenant,
            dataset_id=dataset_id,
            name=name,
            path=relpath,
            rows=len(parsed.rows),
            labels=parsed.labels,
            sha256=parsed.sha256,
            size_bytes=parsed.size_bytes,
            labelled=parsed.labelled,
        )
        session.commit()
    except Exception:
        if not _maybe_committed(session, dataset_id):
            store.path(relpath).unlink(missing_ok=True)
        raise
    return ds


def check_quota(settings: Settings, tenant: str, count: int, used: int, size: int) -> None:
    """413 naming the limit when one more dataset of `size` bytes would pass the tenant's quota."""
    if count + 1 > settings.tenant_max_datasets:
        limit, value = "TENSORQ_TENANT_MAX_DATASETS", settings.tenant_max_datasets
        msg = f"tenant {tenant!r} stores {count} datasets; the quota is {value}"
    elif used + size > settings.tenant_max_dataset_bytes:
        limit, value = "TENSORQ_TENANT_MAX_DATASET_BYTES", settings.tenant_max_dataset_bytes
        msg = (
            f"tenant {tenant!r} stores {used} bytes of datasets; {size} more would pass the quota of {value}"
        )
    else:
        return
    raise HTTPException(status_code=413, detail={"msg": msg, "limit": limit, "quota": value, "used": used})


def _maybe_committed(session: Session, dataset_id: uuid.UUID) -> bool:
    """Whether the row may be in the database after a failed commit.

    commit() can raise after the server committed (the connection dropped before the answer), so
    the row is looked for; if even that fails, the answer is yes and the file stays.
    """
    try:
        session.rollback()
        return session.scalar(select(Dataset.id).where(Dataset.id == dataset_id)) is not None
    except Exception:
        return True


@router.get(
    "/{dataset_id}", response_model=DatasetOut, responses={404: {"model": ErrorOut}}, summary="Get a dataset"
)
def read_dataset(
    dataset_id: uuid.UUID,
    session: Session = Depends(get_session),
    principal: Principal = Depends(current_principal),
) -> DatasetOut:
    ds = get_dataset(session, dataset_id, principal.tenant)
    if ds is None:
        raise HTTPException(status_code=404, detail="dataset not found")
    return dataset_out(ds)


@router.get("", response_model=DatasetList, summary="List datasets, newest first")
def read_datasets(
    limit: int = Query(default=100, ge=1, le=500),
    session: Session = Depends(get_session),
    principal: Principal = Depends(current_principal),
) -> DatasetList:
    return DatasetList(items=[dataset_out(d) for d in list_datasets(session, principal.tenant, limit)])
