"""Tenants' files in the artifact store as the API writes and reads them: sealed with the tenant's
data key (tensorq/core/sealed_files.py), so plaintext never touches the disk.

Dataset uploads and OpenAI batch files (inputs, outputs, error files) are each sealed whole: a
read opens the whole file in memory. They are bounded (TENSORQ_OPENAI_FILE_MAX_BYTES, 64 MiB by
default; datasets by TENSORQ_TENANT_MAX_DATASET_BYTES and the request size), and the batch loop
keeps the input file it is turning into jobs open between its steps (api/openai/batches.py).
A file that does not open raises DataIntegrityError: a 500 and one log line naming the object
(api/errors.py, api/openai/errors.py).
"""

from __future__ import annotations

from urllib.parse import quote

from starlette.responses import Response

from db.keys import tenant_cipher
from tensorq.core.artifacts import ArtifactStore
from tensorq.core.sealed_files import SealedFiles
from tensorq.core.settings import Settings


def tenant_files(settings: Settings, tenant: str) -> SealedFiles:
    return SealedFiles(ArtifactStore(settings.artifact_dir), tenant_cipher(settings.sqlalchemy_url, tenant))


class Download(Response):
    """A file's opened bytes as an attachment (what starlette's FileResponse sends for a path)."""

    media_type = "application/octet-stream"

    def __init__(self, content: bytes, filename: str) -> None:
        quoted = quote(filename)
        disposition = (
            f"attachment; filename*=utf-8''{quoted}"
            if quoted != filename
            else f'attachment; filename="{filename}"'
        )
        super().__init__(content, headers={"content-disposition": disposition})
