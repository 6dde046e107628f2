"""`tensorq datasets upload|list`: a tenant's datasets over the HTTP API, via tensorq.client."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from tensorq.cli.jobs import (
    EXIT_CODES,
    EXIT_USAGE,
    ApiUrl,
    AsJson,
    api,
    print_json,
    stdout_console,
    timestamp,
)

datasets_app = typer.Typer(no_args_is_help=True, help="Datasets: JSONL rows to train and evaluate on.")


@datasets_app.command("upload", epilog=EXIT_CODES)
def upload(
    file: Annotated[
        Path,
        typer.Argument(
            help='JSONL file: one {"text": ..., "label": ...} object a line, or {"text": ...} for text-only'
        ),
    ],
    name: Annotated[str | None, typer.Option(help="A name to recognise it by")] = None,
    as_json: AsJson = False,
    api_url: ApiUrl = None,
) -> None:
    """Upload a dataset; prints its id, which training jobs take as `dataset_id`."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        typer.echo(f"error: cannot read {file}: {exc.strerror or exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    with api(api_url) as client:
        dataset = client.upload_dataset(data, name=name)
    if as_json:
        print_json(dataset)
        return
    labels = ", ".join(dataset.get("labels") or []) or "none (text-only)"
    typer.echo(dataset["id"])
    typer.echo(f"({dataset['rows']} rows, labels: {labels}, {dataset['size_bytes']} bytes)", err=True)


@datasets_app.command("list", epilog=EXIT_CODES)
def list_(
    limit: Annotated[int, typer.Option(min=1, max=500, help="At most this many, newest first")] = 100,
    as_json: AsJson = False,
    api_url: ApiUrl = None,
) -> None:
    """The tenant's datasets, newest first."""
    with api(api_url) as client:
        found = client.datasets(limit=limit)
    if as_json:
        print_json(found)
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for column in ("ID", "NAME", "ROWS", "LABELS", "BYTES", "CREATED"):
        table.add_column(column, no_wrap=column in ("ID", "CREATED"))
    for d in found:
        table.add_row(
            d["id"],
            d.get("name") or "",
            str(d["rows"]),
            ", ".join(d.get("labels") or []),
            str(d["size_bytes"]),
            timestamp(d["created_at"]),
        )
    stdout_console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(datasets_app, name="datasets")
