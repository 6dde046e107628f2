"""`tensorq prune`: retention for finished jobs' results and artifacts (see db/retention.py)."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated

import typer

from tensorq.cli.extras import needs
from tensorq.core.artifacts import ArtifactStore
from tensorq.core.settings import get_settings

if TYPE_CHECKING:
    from db.retention import PruneReport

DURATION_RE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """`90m`, `12h`, `30d` (also `s`, `w`); a positive whole number and one unit."""
    match = DURATION_RE.match(text.lower())
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90m, 12h, 30d)")
    amount = int(match[1])
    if amount <= 0:
        # An age of zero would clear results that clients may still be about to read.
        raise ValueError(f"not a positive duration: {text!r}")
    return timedelta(**{UNITS[match[2]]: amount})


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def render(report: PruneReport) -> str:
    verb = "pruned" if report.applied else "would prune"
    dirs = [p for p in report.removed if p.startswith("jobs/")]
    files = [p for p in report.removed if not p.startswith("jobs/")]
    lines = [
        f"finished before {report.cutoff.isoformat(timespec='seconds')}:",
        f"  {verb} results of {report.results} finished jobs ({human_bytes(report.result_bytes)})",
        f"  {verb} {report.job_dirs} job directories ({human_bytes(report.job_dir_bytes)})",
        *(f"    {path}" for path in dirs),
    ]
    if report.datasets_included:
        lines.append(f"  {verb} {report.datasets} datasets ({human_bytes(report.dataset_bytes)})")
        lines += [f"    {path}" for path in files]
    else:
        lines.append("  datasets kept (pass --datasets to prune them too)")
    if report.skipped:
        lines.append(f"kept {len(report.skipped)}:")
        lines += [f"  {s.path}: {s.reason}" for s in report.skipped]
    if report.errors:
        lines.append(f"failed {len(report.errors)}:")
        lines += [f"  {s.path}: {s.reason}" for s in report.errors]
    if report.applied:
        lines.append(f"freed {human_bytes(report.total_bytes)}")
    else:
        lines.append(
            f"dry run: nothing was changed; would free {human_bytes(report.total_bytes)} (pass --apply)"
        )
    return "\n".join(lines)


@needs("server")
def prune_command(
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than", help="Age like 90m, 12h, 30d (default: TENSORQ_RETENTION_DAYS days, 30)"
        ),
    ] = None,
    datasets: Annotated[
        bool, typer.Option("--datasets", help="Also delete uploaded datasets older than that")
    ] = False,
    apply: Annotated[bool, typer.Option("--apply", help="Prune; without it this is a dry run")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
) -> None:
    """Clear old finished jobs' results and artifacts (the job rows stay); dry run by default.

    Job directories a registered model version points into are kept.
    """
    from db.models import utcnow
    from db.retention import prune
    from db.session import session_scope

    settings = get_settings()
    if older_than is None:
        age = timedelta(days=settings.retention_days)
    else:
        try:
            age = parse_duration(older_than)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--older-than") from None
    with session_scope(settings.sqlalchemy_url) as session:
        report = prune(
            session,
            ArtifactStore(settings.artifact_dir),
            cutoff=utcnow() - age,
            datasets=datasets,
            apply=apply,
        )
    typer.echo(json.dumps(report.as_dict(), indent=2) if as_json else render(report))
    if report.errors:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add `prune` to the `tensorq` command."""
    app.command("prune")(prune_command)
