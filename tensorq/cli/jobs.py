"""`tensorq submit|status|wait|cancel|jobs|models [split|rollback|history]`: the HTTP API from the shell, via tensorq.client.

`register(app)` adds the commands to the main typer app. Every command takes `--api-url`
(default http://TENSORQ_API_HOST:TENSORQ_API_PORT) and `--json`, which prints only JSON on stdout.
Progress and notices go to stderr, results to stdout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from tensorq.client import Client, Job, TensorqError, WaitTimeout

# Exit codes, the same for every command.
EXIT_OK = 0
EXIT_JOB_FAILED = 1  # the job ended failed or cancelled
EXIT_USAGE = 2  # bad options or input, or the API answered 4xx (click uses 2 for usage errors too)
EXIT_UNAVAILABLE = 3  # the API could not be reached, timed out, or answered 5xx
EXIT_WAIT_TIMEOUT = 4  # --timeout ran out while the job was still queued or running
EXIT_INTERRUPTED = 130  # Ctrl-C while waiting; the job itself is left alone

EXIT_CODES = (
    "Exit codes: 0 success (for status: the job is queued, running or succeeded); "
    "1 the job failed or was cancelled; 2 bad usage or a 4xx answer; "
    "3 API unreachable or a 5xx answer; 4 --timeout ran out before the job finished."
)


class Device(StrEnum):
    any = "any"
    gpu = "gpu"
    cpu = "cpu"


class Status(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


ApiUrl = Annotated[
    str | None,
    typer.Option("--api-url", help="Default: http://TENSORQ_API_HOST:TENSORQ_API_PORT", show_default=False),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print only machine-readable JSON on stdout")]
Timeout = Annotated[
    float | None, typer.Option("--timeout", min=0, help="Give up waiting after S seconds (exit 4)")
]


def exit_code_for(exc: TensorqError) -> int:
    if isinstance(exc, WaitTimeout):
        return EXIT_WAIT_TIMEOUT
    if exc.status_code is None or exc.status_code >= 500:
        return EXIT_UNAVAILABLE
    return EXIT_USAGE


def fail(exc: TensorqError) -> NoReturn:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(exit_code_for(exc))


@contextmanager
def api(api_url: str | None) -> Iterator[Client]:
    """A client whose errors end the command with the API's detail on stderr and the right code."""
    if api_url is not None and not api_url.startswith(("http://", "https://")):
        raise typer.BadParameter("must start with http:// or https://", param_hint="--api-url")
    try:
        with Client(api_url) as client:
            yield client
    except TensorqError as exc:
        fail(exc)


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


def print_job(job: Job, as_json: bool) -> None:
    if as_json:
        print_json(job)
    else:
        show_job(job)


def job_exit_code(job: Job) -> int:
    return EXIT_JOB_FAILED if job["status"] in ("failed", "cancelled") else EXIT_OK


def timestamp(value: str | None) -> str:
    """The API's UTC ISO 8601 time as local time to the second (--json keeps the API's own)."""
    if not value:
        return ""
    try:
        return datetime.fromisoformat(value).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return value


def format_progress(progress: dict[str, Any] | None) -> str:
    """`epoch 1/3  step 40/120  loss 0.4213  val_accuracy 0.850` for training, key=value otherwise."""
    if not progress:
        return ""
    parts: list[str] = []
    shown = {"epoch", "epochs", "step", "total_steps", "loss"}
    if "epoch" in progress:
        parts.append(f"epoch {progress['epoch']}/{progress.get('epochs', '?')}")
    if "step" in progress:
        parts.append(f"step {progress['step']}/{progress.get('total_steps', '?')}")
    if "loss" in progress:
        loss = progress["loss"]
        parts.append(f"loss {loss:.4f}" if isinstance(loss, int | float) else "loss -")
    for key in ("val_accuracy", "val_f1"):
        if isinstance(progress.get(key), int | float):
            shown.add(key)
            parts.append(f"{key} {progress[key]:.3f}")
    if not parts:  # a kind with its own progress shape
        parts = [f"{k}={v}" for k, v in progress.items() if k not in shown]
    return "  ".join(parts)


def summarise_result(result: dict[str, Any] | None) -> list[str]:
    """A few readable lines: vectors and predictions are too long to print whole."""
    if not result:
        return []
    if isinstance(result.get("embeddings"), list):
        return [
            f"{len(result['embeddings'])} embedding(s) of dim {result.get('dim')} ({result.get('model')})"
        ]
    if isinstance(result.get("predictions"), list):
        lines = [f"model {result.get('model')}:{result.get('version')}"]
        for i, pred in enumerate(result["predictions"]):
            score = pred.get("scores", {}).get(pred.get("label"))
            lines.append(f"[{i}] {pred.get('label')}" + (f" ({score:.3f})" if score is not None else ""))
        return lines
    if "version" in result and "metrics" in result:
        metrics = "  ".join(
            f"{k} {v:.4f}" for k, v in result["metrics"].items() if isinstance(v, int | float)
        )
        return [f"registered {result.get('model')}:{result['version']}", metrics]
    text = json.dumps(result, ensure_ascii=False)
    return [text if len(text) <= 400 else text[:400] + "…"]


def show_job(job: Job) -> None:
    rows: list[tuple[str, str]] = [
        ("job", job["id"]),
        ("kind", job["kind"]),
        ("status", job["status"] + (" (cancel requested)" if job.get("cancel_requested") else "")),
        ("model", job.get("model") or ""),
        ("worker", f"{job['worker']} ({job.get('device')})" if job.get("worker") else ""),
        ("attempts", f"{job.get('attempts')}/{job.get('max_attempts')}"),
        ("created", timestamp(job.get("created_at"))),
        ("started", timestamp(job.get("started_at"))),
        ("finished", timestamp(job.get("finished_at"))),
        ("progress", format_progress(job.get("progress"))),
    ]
    if job.get("error"):
        rows.append(("error", f"{job['error']['type']}: {job['error']['message']}"))
    rows += [("result", line) for line in summarise_result(job.get("result"))]
    for label, value in rows:
        if value:
            typer.echo(f"{label:<9} {value}")


class ProgressView:
    """Shows a job's changes on stderr while waiting.

    On a terminal, training progress is a live bar (epoch, step/total_steps, loss); elsewhere (logs,
    CI, pipes) every change is one plain line, since a redrawn bar would only garble them."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal and not console.is_dumb_terminal
        self.bar: Progress | None = None
        self.task: TaskID | None = None
        self.status: str | None = None
        self.progress: dict[str, Any] | None = None

    def __call__(self, job: Job) -> None:
        if job["status"] != self.status:
            self.status = job["status"]
            on = f" on {job['worker']}" if job["status"] == "running" and job.get("worker") else ""
            self.console.print(f"{job['id']}: {job['status']}{on}", highlight=False)
        progress = job.get("progress")
        if not progress or progress == self.progress:
            return
        self.progress = progress
        if self.live and isinstance(progress.get("total_steps"), int):
            self._update_bar(progress)
        else:
            self.console.print(f"  {format_progress(progress)}", highlight=False)

    def _update_bar(self, progress: dict[str, Any]) -> None:
        epoch = f"{progress.get('epoch', '?')}/{progress.get('epochs', '?')}"
        loss = f"{progress['loss']:.4f}" if isinstance(progress.get("loss"), int | float) else "-"
        total, step = progress["total_steps"], progress.get("step", 0)
        if self.bar is None:
            self.bar = Progress(
                TextColumn("epoch {task.fields[epoch]}"),
                BarColumn(),
                TextColumn("step"),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                console=self.console,
            )
            self.bar.start()
            self.task = self.bar.add_task("training", total=total, epoch=epoch, loss=loss)
        assert self.task is not None
        self.bar.update(self.task, completed=step, total=total, epoch=epoch, loss=loss)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def wait_and_report(client: Client, job_id: str, timeout: float | None, as_json: bool) -> NoReturn:
    """Wait for the job, print it, and exit with the code its final status calls for."""
    view = None if as_json else ProgressView(Console(stderr=True))
    try:
        job = client.wait(job_id, timeout=timeout, on_change=view)
    except WaitTimeout as exc:
        if view is not None:
            view.close()
        typer.echo(f"error: {exc}", err=True)
        print_job(exc.job, as_json)
        raise typer.Exit(EXIT_WAIT_TIMEOUT) from None
    except KeyboardInterrupt:
        if view is not None:
            view.close()
        typer.echo(f"interrupted; job {job_id} keeps running (tensorq cancel {job_id} stops it)", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if view is not None:
        view.close()
    print_job(job, as_json)
    raise typer.Exit(job_exit_code(job))


def read_input(
    input_json: str | None, input_file: Path | None, texts: list[str] | None, model: str | None
) -> dict[str, Any]:
    if input_json is not None and input_file is not None:
        raise typer.BadParameter("give --input or --input-file, not both", param_hint="--input")
    raw, hint = None, "--input"
    if input_json is not None:
        raw = input_json
    elif input_file is not None:
        hint = "--input-file"
        try:
            raw = sys.stdin.read() if str(input_file) == "-" else input_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {input_file}: {exc.strerror}", param_hint=hint) from None
    data: Any = {}
    if raw is not None:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint=hint) from None
        if not isinstance(data, dict):
            raise typer.BadParameter("must be a JSON object", param_hint=hint)
    # --text and --model fill in the common fields, over anything --input gave them.
    if texts:
        data["texts"] = list(texts)
    if model is not None:
        data["model"] = model
    return data


def submit(
    kind: Annotated[str, typer.Argument(help="embed, classify, train-text-classifier, ...")],
    input_json: Annotated[
        str | None, typer.Option("--input", help="The job's input as a JSON object", show_default=False)
    ] = None,
    input_file: Annotated[
        Path | None,
        typer.Option(
            "--input-file", help="A file holding the input JSON ('-' for stdin)", show_default=False
        ),
    ] = None,
    text: Annotated[
        list[str] | None,
        typer.Option("--text", help="A text for embed/classify; repeat for several", show_default=False),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="classify's model: name, name:3 or name@alias", show_default=False),
    ] = None,
    device: Annotated[Device, typer.Option(help="Require a GPU or CPU worker")] = Device.any,
    webhook: Annotated[
        str | None, typer.Option(help="URL to POST the finished job to (signed)", show_default=False)
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the job to finish")] = False,
    timeout: Timeout = None,
    as_json: AsJson = False,
    api_url: ApiUrl = None,
) -> None:
    """Submit a job; with --wait, wait for it and exit 1 if it fails."""
    data = read_input(input_json, input_file, text, model)
    with api(api_url) as client:
        job = client.submit(kind, data, device=device.value, webhook=webhook)
        if wait:
            if not as_json:
                typer.echo(f"submitted {job['id']} ({job['kind']})", err=True)
            wait_and_report(client, job["id"], timeout, as_json)
    if as_json:
        print_json(job)
    else:
        typer.echo(f"submitted {job['id']} ({job['kind']}, {job['status']})")


def status(job_id: str, as_json: AsJson = False, api_url: ApiUrl = None) -> None:
    """Show a job; exits 1 if it failed or was cancelled."""
    with api(api_url) as client:
        job = client.get(job_id)
    print_job(job, as_json)
    raise typer.Exit(job_exit_code(job))


def wait(job_id: str, timeout: Timeout = None, as_json: AsJson = False, api_url: ApiUrl = None) -> None:
    """Wait for a job to finish, showing its progress; exits 1 if it failed or was cancelled."""
    with api(api_url) as client:
        wait_and_report(client, job_id, timeout, as_json)


def cancel(job_id: str, as_json: AsJson = False, api_url: ApiUrl = None) -> None:
    """Cancel a job: at once if queued, at its next check if running (exit 2 if it already finished)."""
    with api(api_url) as client:
        job = client.cancel(job_id)
    if as_json:
        print_json(job)
    elif job["status"] == "cancelled":
        typer.echo(f"{job['id']}: cancelled")
    else:
        typer.echo(f"{job['id']}: cancel requested; it stops at its next check")


def stdout_console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 200  # piped tables keep whole ids rather than wrapping at 80 columns
    return console


def jobs(
    status: Annotated[Status | None, typer.Option(help="Only jobs in this state")] = None,
    kind: Annotated[str | None, typer.Option(help="Only jobs of this kind")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first")] = 20,
    as_json: AsJson = False,
    api_url: ApiUrl = None,
) -> None:
    """List jobs, newest first (--json: a JSON array of job objects)."""
    found: list[Job] = []
    with api(api_url) as client:
        for job in client.iter_jobs(
            status=status.value if status else None, kind=kind, page_size=min(limit, 200)
        ):
            found.append(job)
            if len(found) >= limit:
                break
    if as_json:
        print_json(found)
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for column in ("ID", "KIND", "STATUS", "MODEL", "PROGRESS / ERROR", "CREATED"):
        table.add_column(column, no_wrap=column in ("ID", "CREATED"))
    for job in found:
        note = f"{job['error']['type']}" if job.get("error") else format_progress(job.get("progress"))
        table.add_row(
            job["id"], job["kind"], job["status"], job.get("model") or "", note, timestamp(job["created_at"])
        )
    stdout_console().print(table)


class ModelsGroup(TyperGroup):
    """`tensorq models` lists the models and `tensorq models NAME` shows one (as before there were
    subcommands); `split`, `rollback` and `history` act on an alias. `show NAME` names a model
    that shares a subcommand's name."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:  # typer's own click types
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "show", self.commands["show"], args
        return super().resolve_command(ctx, args)


models_app = typer.Typer(
    cls=ModelsGroup,
    invoke_without_command=True,
    no_args_is_help=False,
    help="Registered models; an alias's splits, shadow, guard, rollback and history.",
)


@models_app.callback(epilog=EXIT_CODES)
def models(ctx: typer.Context, as_json: AsJson = False, api_url: ApiUrl = None) -> None:
    """Registered models (`models NAME`: one model's versions and aliases)."""
    if ctx.invoked_subcommand is not None:
        return
    with api(api_url) as client:
        found = client.models()
    if as_json:
        print_json(found)
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for column in ("NAME", "LATEST", "VERSIONS", "ALIASES", "VAL_ACCURACY", "CREATED"):
        table.add_column(column)
    for m in found:
        latest = m["versions"][-1] if m["versions"] else {}
        table.add_row(
            m["name"],
            str(m["latest_version"] or ""),
            str(len(m["versions"])),
            aliases_text(m["aliases"]),
            metric(latest.get("metrics", {}), "val_accuracy"),
            timestamp(m["created_at"]),
        )
    stdout_console().print(table)


@models_app.command("show", epilog=EXIT_CODES)
def show_model(
    name: Annotated[str, typer.Argument(help="The model")], as_json: AsJson = False, api_url: ApiUrl = None
) -> None:
    """One model's versions and aliases."""
    with api(api_url) as client:
        found = client.model(name)
    if as_json:
        print_json(found)
        return
    console = stdout_console()
    console.print(
        f"{found['name']}  latest {found['latest_version']}  aliases {aliases_text(found['aliases'])}"
    )
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for column in ("VERSION", "ALIASES", "VAL_ACCURACY", "VAL_F1", "LABELS", "JOB", "CREATED"):
        table.add_column(column, no_wrap=column == "JOB")
    for v in found["versions"]:
        pointing = [a for a, n in found["aliases"].items() if n == v["version"]]
        table.add_row(
            str(v["version"]),
            ", ".join(pointing),
            metric(v["metrics"], "val_accuracy"),
            metric(v["metrics"], "val_f1"),
            ", ".join(v["labels"]),
            v.get("job_id") or "",
            timestamp(v["created_at"]),
        )
    console.print(table)


def parse_split(shares: list[str]) -> dict[int, int]:
    split: dict[int, int] = {}
    for share in shares:
        version, sep, percent = share.partition("=")
        if not sep or not version.isdigit() or not percent.isdigit():
            raise typer.BadParameter(f"{share!r} is not VERSION=PERCENT, e.g. 3=90", param_hint="SHARES")
        split[int(version)] = int(percent)
    return split


def parse_shadow(shadow: str | None) -> tuple[int, int] | None:
    if shadow is None:
        return None
    version, sep, percent = shadow.partition(":")
    if not sep or not version.isdigit() or not percent.isdigit():
        raise typer.BadParameter(f"{shadow!r} is not VERSION:PERCENT, e.g. 5:20", param_hint="--shadow")
    return int(version), int(percent)


@models_app.command("split", epilog=EXIT_CODES)
def split_alias(
    name: Annotated[str, typer.Argument(help="The model")],
    alias: Annotated[str, typer.Argument(help="The alias, e.g. production")],
    shares: Annotated[list[str], typer.Argument(help="VERSION=PERCENT, summing to 100: 3=90 4=10")],
    shadow: Annotated[
        str | None,
        typer.Option(help="VERSION:PERCENT: that share of jobs also runs on VERSION", show_default=False),
    ] = None,
    guard_max_failure_rate: Annotated[
        float | None,
        typer.Option(help="Roll back when a candidate's failure rate exceeds this (0-1)", show_default=False),
    ] = None,
    guard_min_jobs: Annotated[
        int | None,
        typer.Option(help="...over at least this many of its jobs (default 20)", show_default=False),
    ] = None,
    as_json: AsJson = False,
    api_url: ApiUrl = None,
) -> None:
    """Split an alias's new jobs between versions, optionally with a shadow and a guard."""
    split = parse_split(shares)
    guard = None
    if guard_max_failure_rate is not None:
        guard = (guard_max_failure_rate, guard_min_jobs if guard_min_jobs is not None else 20)
    elif guard_min_jobs is not None:
        raise typer.BadParameter("needs --guard-max-failure-rate", param_hint="--guard-min-jobs")
    with api(api_url) as client:
        row = client.set_split(name, alias, split, shadow=parse_shadow(shadow), guard=guard)
    if as_json:
        print_json(row)
        return
    typer.echo(f"{name}@{alias}: {assignment_text(row)}")


@models_app.command("rollback", epilog=EXIT_CODES)
def rollback_alias(
    name: Annotated[str, typer.Argument(help="The model")],
    alias: Annotated[str, typer.Argument(help="The alias")],
    reason: Annotated[str | None, typer.Option(help="Recorded in the history", show_default=False)] = None,
    as_json: AsJson = False,
    api_url: ApiUrl = None,
) -> None:
    """Restore an alias's previous assignment."""
    with api(api_url) as client:
        detail = client.rollback(name, alias, reason)
    if as_json:
        print_json(detail)
        return
    typer.echo(f"{name}@{alias}: rolled back to {assignment_text(detail)}")


@models_app.command("history", epilog=EXIT_CODES)
def alias_history(
    name: Annotated[str, typer.Argument(help="The model")],
    alias: Annotated[str, typer.Argument(help="The alias")],
    as_json: AsJson = False,
    api_url: ApiUrl = None,
) -> None:
    """An alias's assignment, per-version statistics over the recent window, and its history."""
    with api(api_url) as client:
        detail = client.alias(name, alias)
    if as_json:
        print_json(detail)
        return
    console = stdout_console()
    console.print(f"{name}@{alias}: {assignment_text(detail)}  (revision {detail['revision']})")
    stats = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for column in (
        "VERSION",
        "ROLE",
        "SHARE",
        "JOBS",
        "FAILED",
        "FAILURE_RATE",
        "P50_MS",
        "P95_MS",
        "SHADOW_AGREEMENT",
    ):
        stats.add_column(column)
    for s in detail["stats"]:
        shadow = s.get("shadow") or {}
        stats.add_row(
            str(s["version"]),
            s["role"],
            f"{s['percent']}%",
            str(s["jobs"]),
            str(s["by_status"].get("failed", 0)),
            number(s["failure_rate"]),
            number(s["run_ms"]["p50"]),
            number(s["run_ms"]["p95"]),
            number(shadow.get("agreement")),
        )
    console.print(stats)
    changes = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for column in ("AT", "ACTION", "FROM", "TO", "BY", "REASON"):
        changes.add_column(column)
    for h in detail["history"]:
        changes.add_row(
            timestamp(h["at"]), h["action"], assignment_text(h["from"]) if h["from"] else "",
            assignment_text(h["to"]), "guard" if h["key_id"] is None else h["key_id"][:8], h["reason"] or "",
        )  # fmt: skip
    console.print(changes)


def assignment_text(a: dict[str, Any]) -> str:
    split = a.get("split") or {str(a["version"]): 100}
    text = " ".join(f"{v}={p}%" for v, p in split.items())
    if a.get("shadow"):
        text += f" shadow {a['shadow']['version']}:{a['shadow']['percent']}%"
    if a.get("guard"):
        text += f" guard {a['guard']['max_failure_rate']:g} over {a['guard']['min_jobs']} jobs"
    return text


def number(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, int | float) else ""


def aliases_text(aliases: dict[str, int]) -> str:
    return ", ".join(f"{alias}→{version}" for alias, version in sorted(aliases.items()))


def metric(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    return f"{value:.3f}" if isinstance(value, int | float) else ""


def register(app: typer.Typer) -> None:
    """Add the API client commands to the `tensorq` typer app."""
    for command in (submit, status, wait, cancel, jobs):
        app.command(epilog=EXIT_CODES)(command)
    app.add_typer(models_app, name="models")
