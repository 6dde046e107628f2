"""The Python client: submit jobs, wait for them, read results. Needs httpx only (no server extra)."""

from tensorq.client.client import (
    AsyncClient,
    Client,
    Job,
    TensorqConnectionError,
    TensorqError,
    WaitTimeout,
)
from tensorq.core.signing import verify_signature

__all__ = [
    "AsyncClient",
    "Client",
    "Job",
    "TensorqConnectionError",
    "TensorqError",
    "WaitTimeout",
    "verify_signature",
]
