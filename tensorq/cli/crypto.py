"""Encryption at rest, for operators: the master key, data-key rotation, deleting a tenant, and
sealing data stored before encryption (db/rekeying.py does the work; docs/security.md explains).

    tensorq keys generate-master [--out F]
    tensorq keys rotate-master --new-key-file F
    tensorq tenants rotate-data-key T
    tensorq tenants delete T [--apply]
    tensorq encrypt-existing
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tensorq.cli.extras import needs
from tensorq.core.settings import Settings, get_settings

if TYPE_CHECKING:
    from db.keys import Keyring

tenants_app = typer.Typer(no_args_is_help=True, help="Tenants' data: data-key rotation and deletion.")


def write_key_file(path: Path) -> bool:
    """A new master key at `path`, mode 0600, unless a file is there already; True if made."""
    from tensorq.core.crypto import encode_key, generate_key

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(encode_key(generate_key()) + "\n")
    return True


def require_master_key(settings: Settings) -> Keyring:
    """The keyring, or exit 2 with one line: the API, the workers and these commands refuse to
    run without the right master key."""
    from sqlalchemy.exc import SQLAlchemyError

    from db.keys import check_master_key
    from tensorq.core.crypto import MasterKeyError

    try:
        return check_master_key(settings)
    except MasterKeyError as exc:
        typer.echo(f"tensorq: refusing to start: {exc}", err=True)
        raise typer.Exit(2) from None
    except SQLAlchemyError as exc:
        typer.echo(
            f"tensorq: refusing to start: cannot check the master key against the database ({type(exc).__name__}; "
            "is it migrated? `tensorq db upgrade`)",
            err=True,
        )
        raise typer.Exit(2) from None


def _store(settings: Settings):  # type: ignore[no-untyped-def]
    from tensorq.core.artifacts import ArtifactStore

    return ArtifactStore(settings.artifact_dir)


@needs("server")
def keys_generate_master(
    out: Annotated[
        Path | None, typer.Option("--out", help="Write it to this file (mode 0600) instead of stdout")
    ] = None,
) -> None:
    """Make a master key (32 random bytes, base64) for TENSORQ_MASTER_KEY or TENSORQ_MASTER_KEY_FILE."""
    from tensorq.core.crypto import encode_key, generate_key

    if out is None:
        typer.echo(encode_key(generate_key()))
        return
    if not write_key_file(out):
        typer.echo(f"{out} exists; not overwritten", err=True)
        raise typer.Exit(1)
    typer.echo(f"master key written to {out} (mode 0600)", err=True)


@needs("server")
def keys_rotate_master(
    new_key_file: Annotated[
        Path, typer.Option("--new-key-file", help="The new master key (see generate-master)")
    ],
) -> None:
    """Re-wrap every data key with a new master key, in one transaction (no data is rewritten).
    Then restart the API and workers with the new key; the old one no longer starts them."""
    from db.rekeying import rotate_master
    from tensorq.core.crypto import MasterKeyError, read_key_file

    settings = get_settings()
    keyring = require_master_key(settings)
    try:
        new = read_key_file(new_key_file)
        count = rotate_master(keyring.engine, keyring.master, new)
    except MasterKeyError as exc:
        typer.echo(f"tensorq: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"re-wrapped {count} data keys; start every process with the key in {new_key_file} now")


@tenants_app.command("rotate-data-key")
@needs("server")
def tenants_rotate_data_key(
    tenant: Annotated[str, typer.Argument(help="The tenant")],
    settle_seconds: Annotated[
        float | None,
        typer.Option(help="Wait before rewriting (default: twice TENSORQ_DATA_KEY_CACHE_SECONDS)"),
    ] = None,
) -> None:
    """Give TENANT a new data key and re-encrypt its rows and files with it, while the service
    runs; then destroy the old key. Run it again to resume after a crash."""
    from db.rekeying import rotate_data_key

    settings = get_settings()
    keyring = require_master_key(settings)
    try:
        version, done = rotate_data_key(
            keyring.engine, keyring, _store(settings), tenant, settle_seconds=settle_seconds
        )
    except (LookupError, RuntimeError) as exc:
        typer.echo(f"tensorq: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        f"tenant {tenant}: data key {version}; re-encrypted {done.values} values and {done.files} files"
        f" ({done.skipped} changed meanwhile and were already current)"
    )


@tenants_app.command("delete")
@needs("server")
def tenants_delete(
    tenant: Annotated[str, typer.Argument(help="The tenant")],
    apply: Annotated[
        bool, typer.Option("--apply", help="Delete (without it: only show what would go)")
    ] = False,
) -> None:
    """Destroy TENANT's data keys (every copy of its data, backups included, becomes unreadable),
    then delete its rows and files. A dry run unless --apply."""
    from db.rekeying import delete_tenant

    settings = get_settings()
    keyring = require_master_key(settings)
    report = delete_tenant(keyring.engine, keyring, _store(settings), tenant, apply=apply)
    summary = {
        "tenant": tenant,
        "applied": apply,
        "data_keys": report.data_keys,
        "rows": report.rows,
        "files": report.files,
        "file_bytes": report.file_bytes,
    }
    if apply:
        _revoke_cached_keys(settings, report.key_ids)
    typer.echo(json.dumps(summary))
    if not apply:
        typer.echo("(dry run: nothing deleted; add --apply)", err=True)


def _revoke_cached_keys(settings: Settings, key_ids: list[Any]) -> None:
    """The deleted keys out of every API process's key cache (api/keycache.py), as `keys revoke` does."""
    import redis

    from tensorq.core.revocations import publish_revocation

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        if not all([publish_revocation(client, settings.redis_url, key_id) for key_id in key_ids]):
            typer.echo(
                "warning: Redis unreachable; API processes may accept the tenant's keys for up to "
                f"{settings.api_key_cache_seconds:g} s (TENSORQ_API_KEY_CACHE_SECONDS)",
                err=True,
            )
    finally:
        client.close()


@needs("server")
def encrypt_existing_command() -> None:
    """Seal what was stored before encryption existed (job columns, datasets, models, files), then
    refuse plaintext from then on. Resumable, and safe while the service runs."""
    from db.rekeying import count_plaintext, encrypt_existing

    settings = get_settings()
    keyring = require_master_key(settings)
    done = encrypt_existing(keyring.engine, keyring, _store(settings))
    left = count_plaintext(keyring.engine)
    typer.echo(f"sealed {done.values} values and {done.files} files; {left} plaintext values left")
    if left:
        raise typer.Exit(1)


def register(app: typer.Typer, keys_app: typer.Typer) -> None:
    keys_app.command("generate-master")(keys_generate_master)
    keys_app.command("rotate-master")(keys_rotate_master)
    app.add_typer(tenants_app, name="tenants")
    app.command("encrypt-existing")(encrypt_existing_command)
