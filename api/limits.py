"""Per-request limits and references (422 naming the field) and per-tenant quotas (429 with Retry-After)."""

from __future__ import annotations

import math
import threading
import time
import uuid
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.orm import Session

from api.ratelimit import RateLimiter
from api.webhooks.policy import check_url
from db.models import Dataset
from db.queries import count_active_jobs
from db.registry import RegistryError, get_dataset, resolve
from db.session import AsyncSessions
from db.tenants import Principal
from tasks import minilm
from tasks.registry import get_kind
from tensorq.core.broker import queue_for
from tensorq.core.presence import Presence
from tensorq.core.settings import Settings


def check_items(
    request: Request,
    session: Session,
    settings: Settings,
    principal: Principal,
    items: list[Any],
    loc: tuple[str, ...],
) -> None:
    """422 naming the field for a bad item. `items` are validated job bodies; `loc` is where
    they sit in the request (body, or body.jobs). Reads the database only for items that name a
    dataset or a registered model."""
    errors = (
        request_errors(settings, items, loc)
        + dataset_errors(session, principal.tenant, items, loc)
        + model_task_errors(session, principal.tenant, items, loc)
    )
    errors += device_errors(request.app.state.presence, items, loc)
    if errors:
        raise RequestValidationError(errors)


async def admit(request: Request, db: AsyncSessions, settings: Settings, tenant: str, n: int) -> None:
    """The tenant's active-job quota and submission rate, in one Redis round trip (429 when
    over); a refusal by the quota rests on a fresh COUNT from the database
    (tensorq.core.active_jobs). Called after the items were checked: an admitted job is counted."""
    limiter: RateLimiter = request.app.state.rate_limiter
    quota = settings.tenant_max_active_jobs
    verdict = await limiter.admit(tenant, n, quota)
    if verdict.outcome == "seed":
        await limiter.set_active(tenant, await db.run(count_active_jobs, tenant), only_if_missing=True)
        verdict = await limiter.admit(tenant, n, quota)
    if verdict.outcome == "quota":
        active = await db.run(count_active_jobs, tenant)
        if active + n > quota:
            raise over_quota(tenant, active, quota)
        await limiter.set_active(tenant, active, only_if_missing=False)  # it had drifted high
        verdict = await limiter.admit(tenant, n, quota)
        if verdict.outcome == "quota":
            raise over_quota(tenant, int(verdict.value), quota)
    if verdict.outcome == "unavailable":
        # Redis away: the quota from the database's count (read at most every second), no rate.
        counts: ActiveJobCounts = request.app.state.active_jobs
        active_now = await db.run(counts.refusing, tenant, n, quota)
        if active_now is not None:
            raise over_quota(tenant, active_now, quota)
        return
    if verdict.outcome != "rate":
        return
    if math.isinf(verdict.value):
        raise HTTPException(
            status_code=429,
            detail=f"{n} jobs exceed the tenant's burst of {limiter.burst}; send fewer per request",
            headers={"Retry-After": "60"},
        )
    raise HTTPException(
        status_code=429,
        detail=f"over the tenant's submission rate of {limiter.rate:g} jobs/s",
        headers={"Retry-After": str(max(1, math.ceil(verdict.value)))},
    )


def over_quota(tenant: str, active: int, quota: int) -> HTTPException:
    return HTTPException(
        status_code=429,
        detail=f"tenant {tenant!r} has {active} jobs queued or running; the quota is {quota}",
        headers={"Retry-After": "5"},
    )


def request_errors(settings: Settings, items: list[Any], loc: tuple[str, ...]) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        item_loc = (*loc, i) if len(loc) > 1 else loc
        texts = len(getattr(item.input, "texts", ()) or ())
        if texts > settings.max_texts_per_job:
            msg = f"{texts} texts; this server takes at most {settings.max_texts_per_job} per job"
            errors.append({"loc": (*item_loc, "input", "texts"), "msg": msg, "type": "too_long"})
        if item.webhook is not None:
            problem = check_url(str(item.webhook), settings.webhook_allowed_networks)
            if problem:
                errors.append(
                    {"loc": (*item_loc, "webhook"), "msg": f"webhook URL {problem}", "type": "value_error"}
                )
    if len(items) > settings.max_batch_jobs:
        msg = f"at most {settings.max_batch_jobs} jobs per request"
        errors.append({"loc": loc, "msg": msg, "type": "too_long"})
    return errors


def device_errors(presence: Presence, items: list[Any], loc: tuple[str, ...]) -> list[dict[str, Any]]:
    """A job requiring a device ("gpu", "cpu") that no live worker serves would wait forever."""
    errors: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if item.device == "any":
            continue
        queue = queue_for(get_kind(item.kind).category, item.device)
        if not presence.served(queue):
            item_loc = (*loc, i) if len(loc) > 1 else loc
            msg = f'no live worker serves {item.device} jobs of this kind (queue {queue}); use "any"'
            errors.append(
                {"loc": (*item_loc, "device"), "msg": msg, "type": "unavailable", "input": item.device}
            )
    return errors


def dataset_errors(
    session: Session, tenant: str, items: list[Any], loc: tuple[str, ...]
) -> list[dict[str, Any]]:
    """A job naming a dataset its tenant lacks is refused here rather than failed by the worker,
    which checks again: a dataset can be pruned between submission and run. Another tenant's
    dataset is as absent as a missing one. A kind that trains on labels refuses a text-only one."""
    errors: list[dict[str, Any]] = []
    found: dict[str, Dataset | None] = {}
    for i, item in enumerate(items):
        # Whatever the kind, `dataset_id` names a stored dataset (db.retention relies on it too).
        dataset_id = getattr(item.input, "dataset_id", None)
        if dataset_id is None:
            continue
        if dataset_id not in found:
            try:
                found[dataset_id] = get_dataset(session, uuid.UUID(dataset_id), tenant)
            except ValueError:  # not a UUID: no dataset has that id
                found[dataset_id] = None
        dataset = found[dataset_id]
        item_loc = (*loc, i) if len(loc) > 1 else loc
        if dataset is None:
            errors.append(
                {
                    "loc": (*item_loc, "input", "dataset_id"),
                    "msg": "no such dataset",
                    "type": "not_found",
                    "input": dataset_id,
                }
            )
        elif not dataset.labelled and get_kind(item.kind).needs_labels:
            msg = f'dataset has no labels (text-only rows); {item.kind} needs {{"text", "label"}} rows'
            errors.append(
                {
                    "loc": (*item_loc, "input", "dataset_id"),
                    "msg": msg,
                    "type": "unlabelled_dataset",
                    "input": dataset_id,
                }
            )
    return errors


# What the shipped model is, for the kinds' `model_tasks`: an encoder without a masked-LM head.
SHIPPED_TASK = "embedder"


def model_task_errors(
    session: Session, tenant: str, items: list[Any], loc: tuple[str, ...]
) -> list[dict[str, Any]]:
    """A model reference that resolves, in the tenant's registry, to a version of the wrong task
    (a classifier for fill-mask, say) is refused as IncompatibleModel. One that does not resolve
    is left to the worker (ModelNotFound then), as a model may be registered before the job runs.
    Only kinds that declare `model_tasks` pay for the lookup (not embed or classify)."""
    errors: list[dict[str, Any]] = []
    tasks_of: dict[str, str | None] = {}
    labelled: dict[str, bool | None] = {}

    def labelled_of(dataset_id: str | None) -> bool | None:
        """Whether the tenant's dataset has labels; None when there is no such dataset (which
        dataset_errors reports)."""
        if dataset_id is None:
            return None
        if dataset_id not in labelled:
            try:
                dataset = get_dataset(session, uuid.UUID(dataset_id), tenant)
            except ValueError:
                dataset = None
            labelled[dataset_id] = None if dataset is None else bool(dataset.labelled)
        return labelled[dataset_id]

    for i, item in enumerate(items):
        kind = get_kind(item.kind)
        first_field = kind.model_tasks[0][0] if kind.model_tasks else None
        for field, allowed in kind.model_tasks:
            ref = getattr(item.input, field, None)
            if ref is None:
                continue
            if ref not in tasks_of:
                if ref == minilm.MODEL_NAME:
                    tasks_of[ref] = SHIPPED_TASK
                else:
                    try:
                        tasks_of[ref] = resolve(session, tenant, ref).task
                    except (RegistryError, ValueError):
                        tasks_of[ref] = None
            task = tasks_of[ref]
            item_loc = (*loc, i) if len(loc) > 1 else loc
            if task is None and kind.model_must_exist:
                msg = f"{ref!r} names no model version of this tenant's registry"
                errors.append(
                    {"loc": (*item_loc, "input", field), "msg": msg, "type": "ModelNotFound", "input": ref}
                )
            elif task is not None and task in kind.needs_labels_for_tasks and field == first_field:
                dataset = labelled_of(getattr(item.input, "dataset_id", None))
                if dataset is False:
                    msg = f"{ref!r} is a {task} model; {item.kind} of it needs a labelled dataset"
                    errors.append(
                        {
                            "loc": (*item_loc, "input", "dataset_id"),
                            "msg": msg,
                            "type": "unlabelled_dataset",
                            "input": item.input.dataset_id,
                        }
                    )
            if task is not None and task not in allowed:
                msg = f"{ref!r} is a {task} model; {item.kind} needs a {' or '.join(allowed)} model here"
                errors.append(
                    {
                        "loc": (*item_loc, "input", field),
                        "msg": msg,
                        "type": "IncompatibleModel",
                        "input": ref,
                    }
                )
    return errors


class ActiveJobCounts:
    """Each tenant's queued + running jobs for its quota, without a COUNT on every submission.

    The count is read from the database at most every `max_age` seconds and this process adds
    the jobs it accepts meanwhile; jobs that finish are only seen at the next read, so the estimate
    errs high. A submission the estimate would refuse is checked against a fresh count first, so a
    429 always rests on the database. (The COUNT grows with the backlog: at a few hundred queued
    jobs it was 15% of a submission's time.)"""

    def __init__(self, max_age: float = 1.0) -> None:
        self.max_age = max_age
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, float]] = {}  # tenant -> (estimate, when read)

    def refusing(self, session: Session, tenant: str, n: int, quota: int) -> int | None:
        """None when `n` more jobs fit the quota (and they are counted); else the active count."""
        with self._lock:
            estimate, read_at = self._counts.get(tenant, (0, -math.inf))
            if time.monotonic() - read_at <= self.max_age and estimate + n <= quota:
                self._counts[tenant] = (estimate + n, read_at)
                return None
        now = time.monotonic()
        active = count_active_jobs(session, tenant)
        with self._lock:
            if active + n > quota:
                self._counts[tenant] = (active, now)
                return active
            self._counts[tenant] = (active + n, now)
        return None
