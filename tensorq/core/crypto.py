"""Envelope encryption of tenants' data at rest (AES-256-GCM, the `cryptography` library).

One master key (TENSORQ_MASTER_KEY or TENSORQ_MASTER_KEY_FILE) wraps one data key per tenant and
key version; only the wrapped form is stored (db.models.TenantKey). A tenant's data is sealed with
its active data key:

    blob = b"TQ\\x01" | key version (4 bytes, big-endian) | nonce (12) | ciphertext | tag (16)

The associated data names the tenant and the object (a job's column, an artifact's path), so a
blob copied into another row, file or tenant does not open. A value in a text or JSON column is
TEXT_PREFIX plus the blob in base64. Rotating the master key re-wraps data keys and rewrites no
data; destroying a tenant's data keys makes every copy of its data unreadable (crypto-shredding).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tensorq.core.settings import Settings

MAGIC = b"TQ\x01"
_HEADER = struct.Struct(">3sI")
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
OVERHEAD = _HEADER.size + NONCE_BYTES + TAG_BYTES
# A sealed value in a text or JSON column.
TEXT_PREFIX = "tq1:"


class DataIntegrityError(Exception):
    """A sealed object did not open: tampered with, moved from where it was sealed, truncated, or
    sealed with a data key that no longer exists (a deleted tenant). Never wrong output instead."""

    error_type = "DataIntegrityError"

    def __init__(self, what: str, reason: str = "failed its integrity check") -> None:
        super().__init__(f"{what} {reason}")
        self.what = what


class MasterKeyError(Exception):
    """The master key is missing, malformed, or not the one this database's data keys were wrapped with."""


def generate_key() -> bytes:
    return os.urandom(KEY_BYTES)


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode()


def decode_key(text: str, source: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise MasterKeyError(f"{source} is not base64") from None
    if len(key) != KEY_BYTES:
        raise MasterKeyError(f"{source} must be {KEY_BYTES} bytes, base64-encoded (it is {len(key)})")
    return key


def read_key_file(path: Path) -> bytes:
    try:
        text = path.read_text()
    except OSError as exc:
        raise MasterKeyError(f"cannot read the master key file {path}: {exc.strerror}") from None
    return decode_key(text, f"the master key file {path}")


def master_key(settings: Settings) -> bytes:
    """The configured master key; MasterKeyError (one line for the operator) when there is none."""
    if settings.master_key is not None:
        return decode_key(settings.master_key.get_secret_value(), "TENSORQ_MASTER_KEY")
    if settings.master_key_file is not None:
        return read_key_file(settings.master_key_file)
    raise MasterKeyError(
        "no master key: set TENSORQ_MASTER_KEY (32 bytes, base64) or TENSORQ_MASTER_KEY_FILE "
        "(`tensorq keys generate-master > master.key` makes one)"
    )


def fingerprint(master: bytes) -> str:
    """What the database keeps to recognise its master key (an HMAC of a constant, not the key)."""
    return hmac.new(master, b"tensorq master key check v1", hashlib.sha256).hexdigest()


def _wrap_aad(tenant: str, version: int) -> bytes:
    return f"tensorq data key\x1f{tenant}\x1f{version}".encode()


def wrap_data_key(master: bytes, tenant: str, version: int, key: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(master).encrypt(nonce, key, _wrap_aad(tenant, version))


def unwrap_data_key(master: bytes, tenant: str, version: int, wrapped: bytes) -> bytes:
    try:
        return AESGCM(master).decrypt(
            wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _wrap_aad(tenant, version)
        )
    except InvalidTag:
        raise MasterKeyError(
            f"the data key {version} of tenant {tenant!r} does not open with this master key"
        ) from None


@dataclass(frozen=True)
class DataKey:
    version: int
    aead: AESGCM

    @classmethod
    def of(cls, version: int, key: bytes) -> DataKey:
        return cls(version, AESGCM(key))


def seal(key: DataKey, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return _HEADER.pack(MAGIC, key.version) + nonce + key.aead.encrypt(nonce, plaintext, aad)


def is_sealed(blob: bytes) -> bool:
    return blob[: len(MAGIC)] == MAGIC


def sealed_version(blob: bytes, what: str) -> int:
    """The data key version a blob was sealed with; DataIntegrityError if it is not a sealed blob."""
    if len(blob) < OVERHEAD or not is_sealed(blob):
        raise DataIntegrityError(what, "is not sealed")
    return int(_HEADER.unpack_from(blob)[1])


def unseal(key: DataKey, blob: bytes, aad: bytes, what: str) -> bytes:
    start = _HEADER.size
    try:
        return key.aead.decrypt(blob[start : start + NONCE_BYTES], blob[start + NONCE_BYTES :], aad)
    except InvalidTag:
        raise DataIntegrityError(what) from None


def is_sealed_text(value: object) -> bool:
    return isinstance(value, str) and value.startswith(TEXT_PREFIX)


class TenantCipher:
    """One tenant's data keys: seals with the active one, opens with the one a blob names.

    `active` and `lookup` are asked every time (the keyring caches them), so a long-running job
    starts sealing with a new data key soon after a rotation begins."""

    def __init__(self, tenant: str, active: Callable[[], DataKey], lookup: Callable[[int], DataKey]) -> None:
        self.tenant = tenant
        self._active = active
        self._lookup = lookup

    def _aad(self, obj: str) -> bytes:
        return f"{self.tenant}\x1f{obj}".encode()

    def seal(self, data: bytes, obj: str) -> bytes:
        return seal(self._active(), data, self._aad(obj))

    def open(self, blob: bytes, obj: str) -> bytes:
        what = f"{obj} of tenant {self.tenant!r}"
        version = sealed_version(blob, what)
        try:
            key = self._lookup(version)
        except KeyError:
            raise DataIntegrityError(what, f"names data key {version}, which does not exist") from None
        return unseal(key, blob, self._aad(obj), what)

    def version_of(self, blob: bytes, obj: str) -> int:
        return sealed_version(blob, f"{obj} of tenant {self.tenant!r}")

    def seal_text(self, text: str, obj: str) -> str:
        return TEXT_PREFIX + base64.b64encode(self.seal(text.encode(), obj)).decode()

    def open_text(self, value: str, obj: str) -> str:
        return self.open(self._text_blob(value, obj), obj).decode()

    def _text_blob(self, value: str, obj: str) -> bytes:
        if not is_sealed_text(value):
            raise DataIntegrityError(f"{obj} of tenant {self.tenant!r}", "is not sealed")
        try:
            return base64.b64decode(value[len(TEXT_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise DataIntegrityError(f"{obj} of tenant {self.tenant!r}") from None

    def text_version(self, value: str, obj: str) -> int:
        return self.version_of(self._text_blob(value, obj), obj)

    def seal_json(self, value: Any, obj: str) -> str:
        plain = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
        return TEXT_PREFIX + base64.b64encode(self.seal(plain, obj)).decode()

    def open_json(self, value: str, obj: str) -> Any:
        return orjson.loads(self.open(self._text_blob(value, obj), obj))


class PlainCipher(TenantCipher):
    """No encryption: for the benchmark that measures what encryption costs (Settings.benchmark_unencrypted)."""

    def __init__(self, tenant: str) -> None:
        super().__init__(tenant, _no_key, lambda v: _no_key())

    def seal(self, data: bytes, obj: str) -> bytes:
        return data

    def open(self, blob: bytes, obj: str) -> bytes:
        return blob

    def seal_text(self, text: str, obj: str) -> str:
        return text

    def open_text(self, value: str, obj: str) -> str:
        return value

    def seal_json(self, value: Any, obj: str) -> Any:
        return value

    def open_json(self, value: Any, obj: str) -> Any:
        return value


def _no_key() -> DataKey:
    raise RuntimeError("no data keys: encryption is off (benchmark_unencrypted)")
