"""Which columns hold tenant data, and how they are sealed and opened (tensorq/core/crypto.py).

ORM writes and reads go through mapper events: a sealed column is sealed just before its INSERT
or UPDATE (and the plaintext put back on the object after it), and opened when a row is loaded.
The writes that bypass the ORM (db/jobs.py's finishing UPDATEs) call `seal_json`/`seal_text`.

A value that does not open is not an exception at load time (one bad row must not break a claim
of a hundred, or a listing): the attribute becomes an `Unreadable`, which raises the
DataIntegrityError wherever it is used, so the job fails with that type or the API read answers
a generic 500 with a log line naming the object.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, NoReturn

from sqlalchemy import Connection, Engine, event, inspect
from sqlalchemy.orm import Mapper, object_session
from sqlalchemy.orm.attributes import set_committed_value

from db.keys import Keyring, keyring_for
from db.models import Job, OpenAIBatch, ShadowRun
from tensorq.core.crypto import DataIntegrityError, TenantCipher, is_sealed_text

log = logging.getLogger(__name__)

# Per table: (primary key attribute, JSON columns, text columns). Text columns may also hold
# plaintext that the system wrote itself ("lease expired"), never tenant data; JSON ones may not.
SEALED: dict[type, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    Job: ("id", ("params", "result"), ("error_message",)),
    ShadowRun: ("job_id", ("output",), ("error",)),
    OpenAIBatch: ("id", ("batch_metadata",), ()),
}


def object_name(table: str, key: object, column: str) -> str:
    """What a column value's associated data names (with its tenant): table, row, column."""
    return f"{table}/{key}/{column}"


class Unreadable:
    """A sealed value that did not open; any use raises the DataIntegrityError."""

    __slots__ = ("error",)

    def __init__(self, error: DataIntegrityError) -> None:
        self.error = error

    def fail(self, *_: Any, **__: Any) -> NoReturn:
        raise self.error

    __getitem__ = __iter__ = __len__ = __contains__ = __bool__ = __str__ = get = keys = items = values = fail

    def __repr__(self) -> str:
        return f"Unreadable({self.error})"


def check_readable(*values: object) -> None:
    """Raise the DataIntegrityError of the first value that did not open."""
    for value in values:
        if isinstance(value, Unreadable):
            raise value.error


def open_value(keyring: Keyring, cipher: TenantCipher, obj: str, value: Any, *, text: bool) -> Any:
    """The plaintext of a stored value: sealed (opened), None, or plaintext written before
    encryption (accepted only while the database is marked legacy_plaintext; a system message in
    a text column is always plaintext)."""
    if value is None:
        return None
    if is_sealed_text(value):
        try:
            return cipher.open_text(value, obj) if text else cipher.open_json(value, obj)
        except DataIntegrityError as exc:
            log.error("%s", exc, extra={"object": obj})
            return Unreadable(exc)
        except ValueError as exc:  # valid ciphertext of invalid JSON cannot happen unless forged
            err = DataIntegrityError(f"{obj} of tenant {cipher.tenant!r}", f"is not JSON: {exc}")
            return Unreadable(err)
    if text or keyring.legacy_plaintext:
        return value
    err = DataIntegrityError(f"{obj} of tenant {cipher.tenant!r}", "is not sealed")
    log.error("%s", err, extra={"object": obj})
    return Unreadable(err)


def seal_json(cipher: TenantCipher, obj: str, value: Any) -> Any:
    """A JSON column's stored value: None stays SQL NULL (nothing to hide)."""
    if value is None or is_sealed_text(value):
        return value
    return cipher.seal_json(value, obj)


def seal_text(cipher: TenantCipher, obj: str, value: str | None) -> str | None:
    if value is None or is_sealed_text(value):
        return value
    return cipher.seal_text(value, obj)


def open_column(
    bind: Connection | Engine, table: type, tenant: str, key: object, column: str, value: Any
) -> Any:
    """A sealed column's value read outside the ORM (a Core SELECT), opened."""
    _, _, text_cols = SEALED[table]
    keyring = keyring_for(_engine_of(bind))
    obj = object_name(table.__tablename__, key, column)  # type: ignore[attr-defined]
    return open_value(keyring, keyring.cipher(tenant), obj, value, text=column in text_cols)


def _engine_of(bind: Connection | Engine) -> Engine:
    return bind.engine if isinstance(bind, Connection) else bind


def open_row(keyring: Keyring, table: type, target: Any, attrs: Iterable[str] | None = None) -> None:
    key_attr, json_cols, text_cols = SEALED[table]
    state = target.__dict__
    cipher: TenantCipher | None = None
    for col in (*json_cols, *text_cols):
        if (attrs is not None and col not in attrs) or col not in state:
            continue
        value = state[col]
        if value is None or isinstance(value, Unreadable):
            continue
        if cipher is None:
            cipher = keyring.cipher(state["tenant"])
        obj = object_name(table.__tablename__, state[key_attr], col)  # type: ignore[attr-defined]
        set_committed_value(target, col, open_value(keyring, cipher, obj, value, text=col in text_cols))


def _seal_row(table: type, connection: Connection, target: Any, *, update: bool) -> None:
    key_attr, json_cols, text_cols = SEALED[table]
    state = target.__dict__
    attrs = inspect(target).attrs
    plain: dict[str, Any] = {}
    cipher: TenantCipher | None = None
    for col in (*json_cols, *text_cols):
        value = state.get(col)
        if value is None or is_sealed_text(value) or (update and not attrs[col].history.has_changes()):
            continue
        check_readable(value)
        if cipher is None:
            if state.get(key_attr) is None or not state.get("tenant"):
                raise ValueError(f"a {table.__name__} needs its {key_attr} and tenant before it is stored")
            cipher = keyring_for(_engine_of(connection)).cipher(state["tenant"], connection)
        obj = object_name(table.__tablename__, state[key_attr], col)  # type: ignore[attr-defined]
        plain[col] = value
        setattr(
            target, col, seal_text(cipher, obj, value) if col in text_cols else seal_json(cipher, obj, value)
        )
    target.__dict__["_tq_plain"] = plain


def _restore_plain(target: Any) -> None:
    for col, value in target.__dict__.pop("_tq_plain", {}).items():
        set_committed_value(target, col, value)


def _install(table: type) -> None:
    def keyring_of(target: Any, context: Any) -> Keyring | None:
        # No context: a bulk UPDATE synchronising the objects it changed in the session.
        session = context.session if context is not None else object_session(target)
        return None if session is None else keyring_for(_engine_of(session.get_bind()))

    def on_load(target: Any, context: Any) -> None:
        keyring = keyring_of(target, context)
        if keyring is not None:
            open_row(keyring, table, target)

    def on_refresh(target: Any, context: Any, attrs: Iterable[str] | None) -> None:
        keyring = keyring_of(target, context)
        if keyring is not None:
            open_row(keyring, table, target, attrs)

    def before_insert(_mapper: Mapper[Any], connection: Connection, target: Any) -> None:
        _seal_row(table, connection, target, update=False)

    def before_update(_mapper: Mapper[Any], connection: Connection, target: Any) -> None:
        _seal_row(table, connection, target, update=True)

    def after_write(_mapper: Mapper[Any], _connection: Connection, target: Any) -> None:
        _restore_plain(target)

    event.listen(table, "load", on_load)
    event.listen(table, "refresh", on_refresh)
    event.listen(table, "before_insert", before_insert)
    event.listen(table, "before_update", before_update)
    event.listen(table, "after_insert", after_write)
    event.listen(table, "after_update", after_write)


for _table in SEALED:
    _install(_table)
