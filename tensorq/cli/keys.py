"""`tensorq keys ...`: API keys and webhook secrets, straight against the database (for operators).

The server extra's modules are imported inside each command, so the client install can list them."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from tensorq.cli.extras import needs
from tensorq.core.settings import get_settings

keys_app = typer.Typer(
    no_args_is_help=True, help="API keys (only their hashes are stored) and webhook secrets."
)

TenantOption = Annotated[
    str, typer.Option("--tenant", help="Tenant name: lowercase letters, digits, - and _")
]


def _db_url() -> str:
    return get_settings().sqlalchemy_url


@keys_app.command("create")
@needs("server")
def keys_create(
    tenant: TenantOption,
    admin: Annotated[
        bool, typer.Option(help="May manage the tenant's keys and webhook secret over HTTP")
    ] = False,
    label: Annotated[str | None, typer.Option(help="A note to recognise the key by")] = None,
) -> None:
    """Create a key and print it once (the tenant is created on its first key)."""
    from db.session import session_scope
    from db.tenants import create_key

    try:
        with session_scope(_db_url()) as session:
            row, key = create_key(session, tenant, admin=admin, label=label)
            key_id, prefix = row.id, row.prefix
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--tenant") from None
    typer.echo(key)
    typer.echo(
        f"(key {key_id}, prefix {prefix}, tenant {tenant}{', admin' if admin else ''}; "
        "store it now, it is not shown again)",
        err=True,
    )


@keys_app.command("list")
@needs("server")
def keys_list(
    tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant's keys")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines")] = False,
) -> None:
    """Keys by tenant: id, prefix, admin, created, revoked. Never the keys themselves."""
    from db.session import session_scope
    from db.tenants import list_keys

    with session_scope(_db_url()) as session:
        rows = list_keys(session, tenant)
        for k in rows:
            fields = {
                "id": str(k.id),
                "tenant": k.tenant,
                "prefix": k.prefix,
                "admin": k.admin,
                "label": k.label,
                "created_at": k.created_at.isoformat(),
                "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
            }
            if as_json:
                typer.echo(json.dumps(fields))
            else:
                state = "revoked" if k.revoked_at else "active"
                typer.echo(
                    f"{k.id}  {k.prefix}…  {k.tenant:<20} {'admin ' if k.admin else ''}{state}  {k.label or ''}"
                )


@keys_app.command("revoke")
@needs("server")
def keys_revoke(key: Annotated[str, typer.Argument(help="The key's id or its listed prefix")]) -> None:
    """Revoke a key: requests with it are refused from now on."""
    from db.session import session_scope
    from db.tenants import find_key, revoke_key

    with session_scope(_db_url()) as session:
        row = find_key(session, key)
        if row is None:
            typer.echo(f"no single key matches {key!r}", err=True)
            raise typer.Exit(1)
        revoke_key(session, row)
        key_id, prefix, tenant = row.id, row.prefix, row.tenant
    # Committed; now out of every API process's key cache (api/keycache.py).
    import redis

    from tensorq.core.revocations import publish_revocation

    redis_url = get_settings().redis_url
    client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        told = publish_revocation(client, redis_url, key_id)
    finally:
        client.close()
    typer.echo(f"revoked {key_id} ({prefix}…, tenant {tenant})")
    if not told:
        typer.echo(
            "warning: Redis unreachable; API processes still subscribed may accept the key for up to "
            f"{get_settings().api_key_cache_seconds:g} s (TENSORQ_API_KEY_CACHE_SECONDS)",
            err=True,
        )


@keys_app.command("webhook-secret")
@needs("server")
def keys_webhook_secret(
    tenant: TenantOption,
    rotate: Annotated[bool, typer.Option(help="Replace it with a new one first")] = False,
) -> None:
    """Print the tenant's webhook signing secret (receivers verify X-Tensorq-Signature with it)."""
    from db.session import session_scope
    from db.tenants import rotate_webhook_secret, webhook_secret

    try:
        with session_scope(_db_url()) as session:
            secret = rotate_webhook_secret(session, tenant) if rotate else webhook_secret(session, tenant)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--tenant") from None
    typer.echo(secret)


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
