"""Bearer API keys: every /v1 route depends on `current_principal`, which names the caller's tenant."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.deps import get_db
from api.keycache import KeyCache
from api.schemas import ErrorOut
from db.session import AsyncSessions
from db.tenants import Principal, authenticate, hash_key, looks_like_key

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key from `tensorq keys create`, sent as `Authorization: Bearer tq_...`.",
)

UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "Missing, unknown or revoked API key"}
}


async def current_principal(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    db: AsyncSessions = Depends(get_db),
) -> Principal:
    if credentials is None:
        raise HTTPException(
            status_code=401,
            detail="missing API key (Authorization: Bearer <key>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key = credentials.credentials
    cache: KeyCache | None = getattr(request.app.state, "key_cache", None)
    principal = None
    if cache is not None and looks_like_key(key):
        digest = hash_key(key)
        principal = cache.get(digest)
        if principal is None:
            generation = cache.generation
            principal = await db.run(authenticate, key)
            if principal is not None:
                cache.put(digest, principal, generation)
    else:
        principal = await db.run(authenticate, key)
    if principal is None:
        raise HTTPException(
            status_code=401, detail="unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"}
        )
    request.state.tenant = principal.tenant
    return principal


async def admin_principal(principal: Principal = Depends(current_principal)) -> Principal:
    if not principal.admin:
        raise HTTPException(
            status_code=403, detail="this route needs an admin key (tensorq keys create --admin)"
        )
    return principal
