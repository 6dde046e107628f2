"""Params, results and run functions of the `evaluate` and `optimize` kinds (not yet registered:
this module defines no KIND; the service wiring is separate work).

What these need from whoever runs them (the worker):
- `ctx.resolve_model(ref)` -> ResolvedModel(name, version, path) for a tenant's "name", "name:3" or
  "name@alias"; `path` is the version's directory. The shipped base is referred to as
  "all-MiniLM-L6-v2" and resolved here (version 0, the package's own directory), not by the worker.
  A parent recorded in a recipe is resolved as "name:version".
- `ctx.load_dataset(id)` -> [{"text": ..., "label": ...?}, ...] in a stable order.
- A train-text-classifier version should carry `training.json` (`tasks.evaluation.TrainingRecord`:
  dataset_id, seed, validation_split, rule "stratified", rows_sha256), written by the worker from the
  job's params when it registers the version; without it every dataset counts as unseen.
- The result of optimize is registered like a training result (model, artifact_dir, labels,
  metrics) plus parent, method, options, comparison and lineage stored on the version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tasks import minilm
from tasks.classify import ModelRef as TenantModelRef
from tasks.context import JobContext, JobError, ResolvedModel
from tasks.evaluation import (
    ClassifierMetrics,
    CosineMetrics,
    SizeMetrics,
    SpeedMetrics,
    Split,
    TrainingRecord,
    cosine_to,
    evaluate_classifier,
    heldout_split,
    predict_ids,
    read_training_records,
    size,
    speed,
    training_file_text,
)
from tasks.recipes import LineageEntry, ParentRef, Recipe, Step, UnsupportedRecipe
from tasks.train_text_classifier import DatasetId, ModelName
from tensorq.core.sealed_files import PLAIN, Files

SHIPPED = minilm.MODEL_NAME
ModelRef = TenantModelRef | Literal["all-MiniLM-L6-v2"]


# --- evaluate ------------------------------------------------------------------------------------


class EvaluateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelRef = Field(description='"name", "name:3", "name@alias", or "all-MiniLM-L6-v2".')
    dataset_id: DatasetId
    split: Literal["validation", "all"] = Field(
        default="validation",
        description="validation: the rows the version's training held out, or a fixed 20% of a dataset it never saw.",
    )


class SplitInfo(BaseModel):
    split: Literal["validation", "all"]
    rule: str = Field(description='"stratified" (the training split recomputed), "hash20" or "all".')
    source: str = Field(description='"training-validation", "unseen-dataset" or "all-rows".')
    examples: int


class ModelEvaluation(BaseModel):
    """What one model measured; the same code for a parent and its child."""

    model: str
    version: int
    kind: Literal["classifier", "embedder"]
    classifier: ClassifierMetrics | None = None
    cosine_to_parent: CosineMetrics | None = Field(
        default=None, description="Embedders with a parent: cosine of the two models' embeddings."
    )
    speed: SpeedMetrics
    size: SizeMetrics
    recipe: list[str] = Field(default_factory=list, description="Methods of the version's recipe, in order.")


class EvaluateResult(ModelEvaluation):
    dataset_id: str
    split: SplitInfo
    parent: ParentRef | None = None


def resolve(ctx: JobContext, ref: str) -> ResolvedModel:
    if ref == SHIPPED:
        return ResolvedModel(name=SHIPPED, version=0, path=minilm.model_dir())
    return ctx.resolve_model(ref)


def files_of(ctx: JobContext, resolved: ResolvedModel) -> Files:
    """Where a version's files are read through: the tenant's (sealed) files, or plain ones for
    the shipped base, a public package outside the artifact store."""
    return PLAIN if resolved.path == minilm.model_dir() else ctx.files


# The registry tasks both kinds take (db.models.ModelVersion.task): not a masked-LM encoder.
MODEL_TASKS = ("text-classifier", "embedder")


def check_task(ref: str, ctx: JobContext) -> None:
    """The API refused a wrong task at submission where it could; a reference may resolve
    differently by the time the job runs."""
    resolved = resolve(ctx, ref)
    if resolved.task not in MODEL_TASKS:
        raise JobError(
            "IncompatibleModel",
            f"{resolved.name}:{resolved.version} is a {resolved.task} model; a {' or '.join(MODEL_TASKS)} is needed",
        )


def load_served(ctx: JobContext, resolved: ResolvedModel, *, fp32: bool = False) -> Any:
    """The version as serving would run it (recipe applied, device fallbacks), through the cache."""
    from tasks.optimizing import ModelFormatError, load_model

    def load() -> Any:
        try:
            return load_model(resolved.path, ctx.device, fp32=fp32, files=files_of(ctx, resolved))
        except (ModelFormatError, OSError) as exc:
            raise JobError(
                "InvalidModel", f"{resolved.name}:{resolved.version} cannot be loaded: {exc}"
            ) from None

    if fp32:
        return load()
    return ctx.models.get(f"optimized:{resolved.path}@{ctx.device}", load)


def dataset_rows(ctx: JobContext, dataset_id: str, need_labels: bool) -> list[dict[str, Any]]:
    rows = ctx.load_dataset(dataset_id)
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"]:
            raise JobError("InvalidDataset", f"dataset_id: row {i} has no text")
        if need_labels and not isinstance(row.get("label"), str):
            raise JobError(
                "InvalidDataset", f"dataset_id: row {i} has no label, and a classifier needs labelled rows"
            )
    if len(rows) < 2:
        raise JobError(
            "InvalidDataset", f"dataset_id: {dataset_id!r} has {len(rows)} rows, at least 2 needed"
        )
    return rows


def targets_for(labels: list[str], rows: list[dict[str, Any]]) -> list[int]:
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({str(r["label"]) for r in rows} - set(index))
    if unknown:
        raise JobError(
            "InvalidDataset", f"dataset_id: labels {unknown[:5]} are not the model's labels {labels[:10]}"
        )
    return [index[str(r["label"])] for r in rows]


def is_classifier(model: Any) -> bool:
    from tasks.classifier import TextClassifier

    return isinstance(model, TextClassifier)


def measure(
    model: Any,
    resolved: ResolvedModel,
    rows: list[dict[str, Any]],
    ctx: JobContext,
    reference: Any | None = None,
) -> ModelEvaluation:
    """Quality on `rows`, speed on their texts, size of the version's directory."""
    texts = [r["text"] for r in rows]
    ctx.check_cancelled()
    classifier = (
        evaluate_classifier(model, texts, targets_for(model.labels, rows)) if is_classifier(model) else None
    )
    ctx.check_cancelled()
    cosine = (
        cosine_to(model, reference, texts) if reference is not None and not is_classifier(model) else None
    )
    ctx.check_cancelled()
    recipe = getattr(model, "recipe", None)
    return ModelEvaluation(
        model=resolved.name,
        version=resolved.version,
        kind="classifier" if classifier is not None else "embedder",
        classifier=classifier,
        cosine_to_parent=cosine,
        speed=speed(model, texts),
        size=size(model, resolved.path),
        recipe=[s.method for s in recipe.steps] if recipe is not None else [],
    )


def evaluation_rows(
    rows: list[dict[str, Any]], params_split: str, dataset_id: str, records: list[TrainingRecord]
) -> tuple[list[dict[str, Any]], SplitInfo, Split]:
    split = heldout_split(rows, dataset_id, records)
    if params_split == "all":
        return rows, SplitInfo(split="all", rule="all", source="all-rows", examples=len(rows)), split
    val = [rows[i] for i in split.val_idx]
    return val, SplitInfo(split="validation", rule=split.rule, source=split.source, examples=len(val)), split


def run_evaluate(params: EvaluateParams, ctx: JobContext) -> EvaluateResult:
    resolved = resolve(ctx, params.model)
    model = load_served(ctx, resolved)
    rows = dataset_rows(ctx, params.dataset_id, need_labels=is_classifier(model))
    chosen, info, _ = evaluation_rows(
        rows, params.split, params.dataset_id, read_training_records(resolved.path, files_of(ctx, resolved))
    )
    recipe: Recipe | None = getattr(model, "recipe", None)
    parent = recipe.parent if recipe is not None else None
    reference = None
    if parent is not None and not is_classifier(model):
        reference = load_served(
            ctx, resolve(ctx, parent.name if parent.name == SHIPPED else f"{parent.name}:{parent.version}")
        )
    evaluation = measure(model, resolved, chosen, ctx, reference)
    return EvaluateResult(**evaluation.model_dump(), dataset_id=params.dataset_id, split=info, parent=parent)


# --- optimize ------------------------------------------------------------------------------------


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Int8Options(_Options):
    method: Literal["quantize-int8"] = Field(default="quantize-int8", exclude=True)
    per_channel: bool = True
    min_cosine: float = Field(
        default=0.983, ge=0.5, le=1.0, description="Embedders: mean cosine to fp32 to keep."
    )
    min_agreement: float = Field(
        default=0.995, ge=0.5, le=1.0, description="Classifiers: share of unchanged predictions."
    )
    max_fp32_layers: int = Field(
        default=4, ge=0, le=64, strict=True, description="Linear layers that may stay fp32."
    )
    fp32_layers: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None, max_length=200, description="Module names to keep fp32, instead of measuring."
    )
    calibration_texts: int = Field(default=128, ge=8, le=1024, strict=True)


class HalfOptions(_Options):
    method: Literal["quantize-fp16", "quantize-bf16"] = Field(default="quantize-fp16", exclude=True)


class _TrainOptions(_Options):
    learning_rate: float = Field(default=1e-4, ge=1e-6, le=1e-2, allow_inf_nan=False)
    batch_size: int = Field(default=32, ge=1, le=256, strict=True)
    temperature: float = Field(default=2.0, ge=1.0, le=20.0, allow_inf_nan=False)
    alpha: float = Field(
        default=0.5, ge=0.0, le=1.0, allow_inf_nan=False, description="Weight of the soft targets."
    )
    loss: Literal["mse", "cosine"] = Field(
        default="mse", description="Embedders: distance to the teacher's embeddings."
    )
    seed: int = Field(default=0, ge=0, le=2**32 - 1, strict=True)


class DistillOptions(_TrainOptions):
    method: Literal["distill"] = Field(default="distill", exclude=True)
    student_layers: int = Field(default=3, ge=1, le=48, strict=True)
    epochs: int = Field(default=3, ge=1, le=50, strict=True)


class PruneOptions(_TrainOptions):
    method: Literal["prune-ffn"] = Field(default="prune-ffn", exclude=True)
    keep_fraction: float = Field(default=0.5, gt=0.0, lt=1.0, allow_inf_nan=False)
    importance: Literal["auto", "taylor", "activation"] = Field(
        default="auto", description="auto: taylor (activation x gradient) with labels, else activation."
    )
    importance_texts: int = Field(default=512, ge=8, le=8192, strict=True)
    recovery_epochs: int = Field(default=1, ge=0, le=20, strict=True)


class _UnknownMethod(BaseModel):
    model_config = ConfigDict(extra="allow")  # the error is reported once, at `method`


OPTIONS: dict[str, type[_Options]] = {
    "quantize-int8": Int8Options,
    "quantize-fp16": HalfOptions,
    "quantize-bf16": HalfOptions,
    "distill": DistillOptions,
    "prune-ffn": PruneOptions,
}
OptimizeMethod = Literal["quantize-int8", "quantize-fp16", "quantize-bf16", "distill", "prune-ffn"]


def _options_tag(value: Any) -> str:
    method = value.get("method") if isinstance(value, dict) else getattr(value, "method", None)
    if method in ("quantize-fp16", "quantize-bf16"):
        return "half"
    return method if method in OPTIONS else "unknown"


Options = Annotated[
    Annotated[Int8Options, Tag("quantize-int8")]
    | Annotated[HalfOptions, Tag("half")]
    | Annotated[DistillOptions, Tag("distill")]
    | Annotated[PruneOptions, Tag("prune-ffn")]
    | Annotated[_UnknownMethod, Tag("unknown")],
    Discriminator(_options_tag),
]


class OptimizeParams(BaseModel):
    """`options` is checked against `method`: a bad option is an error at ("options", <method>, <name>)."""

    model_config = ConfigDict(extra="forbid")

    model: ModelRef = Field(description='The parent: "name", "name:3", "name@alias", or "all-MiniLM-L6-v2".')
    method: OptimizeMethod
    dataset_id: DatasetId = Field(description="Rows to calibrate, distil or prune on, and to compare on.")
    options: Options = Field(default_factory=dict, validate_default=True)
    model_name: ModelName | None = Field(
        default=None, validate_default=True, description="Register under this name; default: the parent's."
    )

    @model_validator(mode="before")
    @classmethod
    def _method_into_options(cls, data: Any) -> Any:
        if isinstance(data, dict):
            options = data.get("options", {})
            method = data.get("method")
            # `method` is checked as a field; here only a string can name one (a list or an object
            # is not hashable, and was a 500).
            if isinstance(options, dict) and isinstance(method, str) and method in OPTIONS:
                data = {**data, "options": {**options, "method": data["method"]}}
        return data

    @field_validator("model_name")
    @classmethod
    def _name_for_shipped(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("model") == SHIPPED:
            raise ValueError(f"a model derived from {SHIPPED} needs a model_name to register it under")
        return value

    def option_values(self) -> dict[str, Any]:
        return self.options.model_dump(mode="json")


class Comparison(BaseModel):
    dataset_id: str
    split: SplitInfo
    parent: ModelEvaluation
    child: ModelEvaluation
    ratios: dict[str, float | None] = Field(
        description="child / parent for throughput, latency, sizes; differences in points for accuracy and macro-F1."
    )


class OptimizeResult(BaseModel):
    """`model`, `artifact_dir`, `labels` and `metrics` are registered as for training; `parent`, `method`,
    `options`, `comparison` and `lineage` go onto the new version too."""

    model: str
    version: int | None = None
    kind: Literal["classifier", "embedder"]
    artifact_dir: str | None = None
    artifact: str | None = None
    labels: list[str] = Field(default_factory=list, description="Empty for an embedder.")
    metrics: dict[str, float | None]
    parent: ParentRef
    method: OptimizeMethod
    options: dict[str, Any]
    recipe: Recipe
    comparison: Comparison
    lineage: list[LineageEntry]
    steps: int | None = Field(default=None, description="Training steps (distill, prune recovery).")
    resumed_from_step: int | None = None


def ratios(parent: ModelEvaluation, child: ModelEvaluation) -> dict[str, float | None]:
    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    out: dict[str, float | None] = {
        "throughput": ratio(child.speed.throughput_per_s, parent.speed.throughput_per_s),
        "latency_p50": ratio(child.speed.latency_p50_ms, parent.speed.latency_p50_ms),
        "latency_p95": ratio(child.speed.latency_p95_ms, parent.speed.latency_p95_ms),
        "memory_bytes": ratio(child.size.memory_bytes, parent.size.memory_bytes),
        "disk_bytes": ratio(child.size.disk_bytes, parent.size.disk_bytes),
        "parameters": ratio(child.size.parameters, parent.size.parameters),
    }
    if parent.classifier is not None and child.classifier is not None:
        out["accuracy_delta_points"] = 100 * (child.classifier.accuracy - parent.classifier.accuracy)
        out["macro_f1_delta_points"] = 100 * (child.classifier.macro_f1 - parent.classifier.macro_f1)
    if child.cosine_to_parent is not None:
        out["mean_cosine"] = child.cosine_to_parent.mean_cosine
        out["min_cosine"] = child.cosine_to_parent.min_cosine
    return out


def output_dir(ctx: JobContext) -> Path:
    import tempfile

    if ctx.work_dir is None:
        return Path(tempfile.mkdtemp(prefix="tensorq-model-")) / "model"
    # Per attempt: a stale attempt saving late must not replace a registered version's files.
    return ctx.work_dir / ("model" if ctx.attempt is None else f"model-{ctx.attempt}")


def run_optimize(params: OptimizeParams, ctx: JobContext) -> OptimizeResult:
    import torch

    from tasks import optimizing as opt

    method, options = params.method, params.options
    resolved = resolve(ctx, params.model)
    parent = load_served(ctx, resolved)
    parent_recipe: Recipe = getattr(parent, "recipe", None) or Recipe()
    classifier = is_classifier(parent)
    if parent_recipe.load_steps():
        done = parent_recipe.load_steps()[-1].method
        raise UnsupportedRecipe(
            f"model: {resolved.name}:{resolved.version} is already {done}; optimise its parent, and quantise last"
        )
    opt.require_device(method, ctx.device)
    rows = dataset_rows(ctx, params.dataset_id, need_labels=classifier)
    files = files_of(ctx, resolved)
    records = read_training_records(resolved.path, files)
    chosen, info, split = evaluation_rows(rows, "validation", params.dataset_id, records)
    train_rows = [rows[i] for i in split.train_idx]
    train_texts = [r["text"] for r in train_rows]
    train_targets = targets_for(parent.labels, train_rows) if classifier else None

    step = Step(method=method, options=params.option_values())
    outcome: opt.DistillOutcome | None = None
    identity = f"{method}:{opt.weights_digest(resolved.path, files)}"
    if method == "quantize-int8":
        assert isinstance(options, Int8Options)
        base = opt.load_model(resolved.path, "cpu", fp32=True, files=files)
        names = {n for n, m in opt.bert(base).named_modules() if isinstance(m, torch.nn.Linear)}
        if options.fp32_layers is not None:
            unknown = sorted(set(options.fp32_layers) - names)
            if unknown:
                raise JobError("InvalidOptions", f"options.fp32_layers: no Linear layers named {unknown[:3]}")
            fp32_modules, figures = list(options.fp32_layers), {}
        else:
            choice = opt.choose_fp32_modules(
                base,
                train_texts[: options.calibration_texts],
                per_channel=options.per_channel,
                min_cosine=options.min_cosine,
                min_agreement=options.min_agreement,
                max_fp32_layers=options.max_fp32_layers,
                check=ctx.check_cancelled,
            )
            fp32_modules = choice.fp32_modules
            figures = {
                "measure": choice.measure,
                "all_int8": choice.all_int8_quality,
                "chosen": choice.quality,
                "trail": choice.trail,
                "calibration_texts": min(len(train_texts), options.calibration_texts),
            }
        step.at_load = True
        step.resolved = {
            "fp32_modules": fp32_modules,
            "per_channel": options.per_channel,
            "engine": torch.backends.quantized.engine,
            "calibration": figures,
        }
        to_save = base
    elif method in ("quantize-fp16", "quantize-bf16"):
        step.at_load = True
        to_save = opt.half_precision_weights(
            opt.load_model(resolved.path, ctx.device, fp32=True, files=files), method
        )
    elif method == "distill":
        assert isinstance(options, DistillOptions)
        base = opt.load_model(resolved.path, ctx.device, fp32=True, files=files)
        n_teacher = len(opt.bert(base).encoder.layer)
        if options.student_layers >= n_teacher:
            raise JobError(
                "InvalidOptions",
                f"options.student_layers: must be below the teacher's {n_teacher} layers, got {options.student_layers}",
            )
        student = opt.build_student(base, options.student_layers)
        step.resolved = {"teacher_layers": opt.student_layer_indices(n_teacher, options.student_layers)}
        settings = opt.DistillSettings(**options.model_dump(include=set(opt.DistillSettings.model_fields)))
        outcome = opt.Distiller(
            parent, student, train_texts, train_targets, settings, ctx, f"{identity}:{options.student_layers}"
        ).run()
        to_save = student
    else:
        assert isinstance(options, PruneOptions)
        base = opt.load_model(resolved.path, ctx.device, fp32=True, files=files)
        taylor = options.importance == "taylor" or (options.importance == "auto" and classifier)
        if options.importance == "taylor" and not classifier:
            raise JobError(
                "InvalidOptions", "options.importance: taylor needs a classifier with labelled rows"
            )
        scores = opt.ffn_importance(
            base,
            train_texts[: options.importance_texts],
            train_targets[: options.importance_texts] if taylor and train_targets is not None else None,
            check=ctx.check_cancelled,
        )
        to_save, kept = opt.prune_ffn(base, scores, options.keep_fraction)
        step.resolved = {"intermediate_size": kept, "importance": "taylor" if taylor else "activation"}
        if options.recovery_epochs > 0:
            settings = opt.DistillSettings(
                epochs=options.recovery_epochs,
                **options.model_dump(include=set(opt.DistillSettings.model_fields) - {"epochs"}),
            )
            outcome = opt.Distiller(
                parent,
                to_save,
                train_texts,
                train_targets,
                settings,
                ctx,
                f"{identity}:{options.keep_fraction}:{step.resolved['importance']}",
                phase="prune-recovery",
            ).run()
    ctx.check_cancelled()

    name = params.model_name or resolved.name
    parent_ref = ParentRef(name=resolved.name, version=resolved.version)
    lineage = [
        *parent_recipe.lineage,
        LineageEntry(model=resolved.name, version=resolved.version, method=method, options=step.options),
    ]
    recipe = Recipe(parent=parent_ref, steps=[*parent_recipe.steps, step], lineage=lineage)
    child_records = [*records]
    if not any(r.dataset_id == params.dataset_id for r in records):
        child_records.append(split.record)
    out = opt.save_model(
        to_save, output_dir(ctx), recipe, {"training.json": training_file_text(child_records)}, ctx.files
    )

    child = opt.load_model(out, ctx.device, files=ctx.files)
    child_resolved = ResolvedModel(name=name, version=0, path=out)  # version: set when registered
    parent_eval = measure(parent, resolved, chosen, ctx)
    child_eval = measure(child, child_resolved, chosen, ctx, reference=parent)
    r = ratios(parent_eval, child_eval)
    if isinstance(child, opt.OptimizedClassifier):
        texts = [row["text"] for row in chosen]
        agree = sum(
            a == b for a, b in zip(predict_ids(parent, texts), predict_ids(child, texts), strict=True)
        )
        r["agreement"] = agree / len(texts)
    metrics: dict[str, float | None] = {
        "val_accuracy": child_eval.classifier.accuracy if child_eval.classifier else None,
        "val_f1": child_eval.classifier.macro_f1 if child_eval.classifier else None,
        "mean_cosine_to_parent": child_eval.cosine_to_parent.mean_cosine
        if child_eval.cosine_to_parent
        else None,
        "throughput_per_s": child_eval.speed.throughput_per_s,
        "latency_p50_ms": child_eval.speed.latency_p50_ms,
        "memory_bytes": float(child_eval.size.memory_bytes),
        "train_loss": outcome.train_loss if outcome is not None else None,
    }
    return OptimizeResult(
        model=name,
        kind="classifier" if classifier else "embedder",
        artifact_dir=str(out),
        labels=list(parent.labels) if classifier else [],
        metrics=metrics,
        parent=parent_ref,
        method=method,
        options=step.options,
        recipe=recipe,
        comparison=Comparison(
            dataset_id=params.dataset_id, split=info, parent=parent_eval, child=child_eval, ratios=r
        ),
        lineage=lineage,
        steps=outcome.steps if outcome is not None else None,
        resumed_from_step=outcome.resumed_from_step if outcome is not None else None,
    )


def check_dataset(
    params: OptimizeParams | EvaluateParams, kind: str, rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Errors an API that can read the dataset and the model's kind may answer 422 with, located at
    the field (pydantic's error shape): a classifier needs labelled rows."""
    if kind == "classifier" and any(not isinstance(r.get("label"), str) for r in rows):
        return [
            {
                "loc": ["dataset_id"],
                "msg": "the model is a classifier and this dataset has rows without a label",
                "type": "dataset_without_labels",
            }
        ]
    return []
