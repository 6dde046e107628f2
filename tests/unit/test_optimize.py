"""evaluate and optimize as plain Python: a tiny real classifier, every method, resume, bad input."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tasks import classifier as clf
from tasks import evaluation, minilm
from tasks import optimizing as opt
from tasks.context import JobContext, JobError, ResolvedModel
from tasks.data import load_jsonl, sample_dataset_path
from tasks.optimize_jobs import (
    EvaluateParams,
    OptimizeParams,
    OptimizeResult,
    check_dataset,
    run_evaluate,
    run_optimize,
)
from tasks.recipes import Recipe, Step, UnsupportedRecipe, apply_recipe, model_nbytes, serving_device
from tasks.train_text_classifier import TrainParams, macro_f1
from tasks.train_text_classifier import run as train

SETTINGS: dict[str, Any] = {
    "epochs": 1,
    "learning_rate": 3e-4,
    "batch_size": 16,
    "max_seq_length": 32,
    "validation_split": 0.25,
    "seed": 0,
    "model_name": "sentiment",
}
TRAIN_OPTIONS = {"epochs": 2, "batch_size": 16, "learning_rate": 3e-4}


class Interrupted(Exception):
    """Stands in for a worker dying mid-job."""


class Registry:
    """A stand-in for the model registry and dataset store the worker provides."""

    def __init__(self) -> None:
        self.versions: dict[str, list[Path]] = {}
        self.datasets: dict[str, list[dict[str, Any]]] = {}

    def register(self, name: str, path: Path) -> int:
        self.versions.setdefault(name, []).append(Path(path))
        return len(self.versions[name])

    def resolve(self, ref: str) -> ResolvedModel:
        name, _, version = ref.partition(":")
        if name not in self.versions:
            raise JobError("ModelNotFound", ref)
        v = int(version) if version else len(self.versions[name])
        return ResolvedModel(name=name, version=v, path=self.versions[name][v - 1])

    def ctx(self, work_dir: Path | None = None, attempt: int | None = None, **kw: Any) -> JobContext:
        return JobContext(
            work_dir=work_dir,
            attempt=attempt,
            resolve_model=self.resolve,
            load_dataset=lambda dataset_id: self.datasets[dataset_id],
            **kw,
        )


@pytest.fixture(autouse=True)
def quick_speed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluation, "LATENCY_RUNS", 5)
    monkeypatch.setattr(evaluation, "THROUGHPUT_TEXTS", 64)
    monkeypatch.setattr(evaluation, "THROUGHPUT_PASSES", 1)


def tiny_encoder(seed: int) -> Any:
    """A 4-layer BERT of width 32 on MiniLM's vocabulary: the methods' mechanics, in seconds."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(config, add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    import torch
    from transformers import AutoTokenizer

    data = load_jsonl(sample_dataset_path())
    rows = [r for r in data if r["label"] == "positive"][:40] + [r for r in data if r["label"] == "negative"][
        :40
    ]
    reg = Registry()
    reg.datasets["reviews"] = rows
    reg.datasets["unlabelled"] = [{"text": r["text"]} for r in data[:40]]
    reg.datasets["texts"] = [{"text": r["text"]} for r in data[:40]]
    record = {"dataset_id": "reviews", "rule": "stratified", "seed": 0, "validation_split": 0.25}

    # A real fine-tuned MiniLM classifier, for evaluate and int8 at full size.
    work = tmp_path_factory.mktemp("train")
    result = train(
        TrainParams.model_validate({"data": rows, **SETTINGS}), JobContext(work_dir=work, attempt=1)
    )
    assert result.artifact_dir is not None
    path = Path(result.artifact_dir)
    # What the worker records on a train-text-classifier version (tasks.evaluation.TrainingRecord).
    (path / evaluation.TRAINING_FILE).write_text(json.dumps(record))
    reg.register("sentiment", path)
    reg.train_result = result  # type: ignore[attr-defined]

    # Tiny untrained models of the same shape of code: a classifier and an embedder.
    tokenizer = AutoTokenizer.from_pretrained(minilm.model_dir(), local_files_only=True)
    tiny = clf.TextClassifier(
        tokenizer=tokenizer,
        encoder=tiny_encoder(1),
        head=torch.nn.Linear(32, 2),
        labels=result.labels,
        max_seq_length=16,
        device="cpu",
    )
    tiny_dir = clf.save_classifier(tiny, tmp_path_factory.mktemp("tiny") / "v1")
    (tiny_dir / evaluation.TRAINING_FILE).write_text(json.dumps(record))
    reg.register("tiny", tiny_dir)
    emb = opt.OptimizedEncoder(tokenizer=tokenizer, model=tiny_encoder(2), device="cpu", max_seq_length=16)
    reg.register("tiny-emb", opt.save_model(emb, tmp_path_factory.mktemp("tiny-emb") / "v1", Recipe(), {}))
    yield reg


def optimize(
    reg: Registry, tmp: Path, method: str, attempt: int = 1, model: str = "tiny:1", **kw: Any
) -> OptimizeResult:
    params = OptimizeParams.model_validate({"model": model, "method": method, "dataset_id": "reviews", **kw})
    return run_optimize(params, reg.ctx(work_dir=tmp, attempt=attempt))


def check_child(result: OptimizeResult, labels: list[str], texts: list[str]) -> opt.AnyModel:
    assert result.artifact_dir is not None
    child = opt.load_model(result.artifact_dir)
    assert isinstance(child, clf.TextClassifier)
    predictions = clf.predict(child, texts)
    assert {label for label, _ in predictions} <= set(labels)
    assert all(abs(sum(scores.values()) - 1) < 1e-4 for _, scores in predictions)
    assert result.comparison.split.source == "training-validation"
    assert result.comparison.parent.classifier is not None and result.comparison.child.classifier is not None
    assert result.comparison.ratios["throughput"] is not None
    return child


# --- evaluate ---------------------------------------------------------------------------------


def test_evaluate_reports_what_direct_computation_gives(registry: Registry) -> None:
    result = run_evaluate(EvaluateParams(model="sentiment", dataset_id="reviews"), registry.ctx())
    assert result.split.source == "training-validation" and result.split.rule == "stratified"
    # The same held-out rows the training itself validated on, hence the same accuracy.
    trained = registry.train_result  # type: ignore[attr-defined]
    assert result.split.examples == trained.val_examples
    assert result.classifier is not None
    assert result.classifier.accuracy == pytest.approx(trained.metrics.val_accuracy)

    rows = registry.datasets["reviews"]
    _, val = evaluation.stratified_split(rows, 0, 0.25)
    model = clf.load_classifier(registry.resolve("sentiment").path)
    labels = model.labels
    truth = [labels.index(rows[i]["label"]) for i in val]
    pred = [labels.index(label) for label, _ in clf.predict(model, [rows[i]["text"] for i in val])]
    assert result.classifier.accuracy == pytest.approx(
        sum(t == p for t, p in zip(truth, pred, strict=True)) / len(val)
    )
    assert result.classifier.macro_f1 == pytest.approx(macro_f1(truth, pred))
    assert result.classifier.labels == labels
    cm = result.classifier.confusion_matrix
    assert [
        [sum(1 for t, p in zip(truth, pred, strict=True) if (t, p) == (i, j)) for j in range(2)]
        for i in range(2)
    ] == cm
    for i, label in enumerate(labels):
        tp = cm[i][i]
        m = result.classifier.per_label[label]
        assert m.support == sum(cm[i])
        assert m.recall == pytest.approx(tp / sum(cm[i]) if sum(cm[i]) else 0.0)
    assert result.size.parameters == sum(p.numel() for _, p in model.named_parameters())
    assert result.size.disk_bytes > result.size.memory_bytes * 0.9
    assert result.speed.throughput_per_s > 0 and result.speed.latency_p95_ms >= result.speed.latency_p50_ms


def test_unseen_dataset_gets_a_fixed_fifth_and_all_takes_everything(registry: Registry) -> None:
    rows = registry.datasets["reviews"]
    registry.datasets["other"] = rows
    a = run_evaluate(EvaluateParams(model="tiny", dataset_id="other"), registry.ctx())
    assert a.split.source == "unseen-dataset" and a.split.examples == 16
    assert evaluation.hash20_split(80, "other") == evaluation.hash20_split(80, "other")
    assert evaluation.hash20_split(80, "other") != evaluation.hash20_split(80, "another")
    b = run_evaluate(EvaluateParams(model="tiny", dataset_id="other", split="all"), registry.ctx())
    assert b.split.examples == 80


# --- optimize: each method ---------------------------------------------------------------------


def test_int8_child_is_smaller_and_predicts(registry: Registry, tmp_path: Path) -> None:
    result = optimize(
        registry,
        tmp_path,
        "quantize-int8",
        model="sentiment:1",
        options={"calibration_texts": 16, "max_fp32_layers": 0},
    )
    labels = registry.train_result.labels  # type: ignore[attr-defined]
    child = check_child(result, labels, ["Great kettle.", "Awful film."])
    parent = opt.load_model(registry.resolve("sentiment").path)
    # Linear layers 4x smaller; the 47 MB word embeddings stay fp32 (quantize_dynamic skips them).
    assert model_nbytes(child) < model_nbytes(parent) * 0.7
    assert child.nbytes() == model_nbytes(child)  # what the worker's model cache counts
    assert result.comparison.child.size.memory_bytes < result.comparison.parent.size.memory_bytes * 0.7
    assert result.recipe.steps[-1].at_load and result.recipe.steps[-1].method == "quantize-int8"
    assert result.artifact_dir == str(tmp_path / "model-1")
    assert result.parent.name == "sentiment" and result.parent.version == 1
    assert [e.method for e in result.lineage] == ["quantize-int8"]
    # The fp32 weights stay loadable by the plain loader; nothing in the directory is pickled.
    clf.load_classifier(result.artifact_dir)
    assert not list(Path(result.artifact_dir).glob("*.pt")) and not list(
        Path(result.artifact_dir).glob("*.bin")
    )


def test_int8_measures_which_layers_stay_fp32(registry: Registry) -> None:
    model = opt.load_model(registry.resolve("tiny").path)
    texts = [r["text"] for r in registry.datasets["reviews"][:16]]
    # An agreement above 1 is never reached: the search keeps its maximum of layers fp32.
    choice = opt.choose_fp32_modules(model, texts, min_agreement=1.01, max_fp32_layers=2)
    assert choice.measure == "agreement" and len(choice.fp32_modules) == 2
    assert [t["fp32_modules"] for t in choice.trail] == [0, 1, 2]
    emb = opt.load_model(registry.resolve("tiny-emb").path)
    choice = opt.choose_fp32_modules(emb, texts, min_cosine=0.0)
    assert choice.measure == "mean_cosine" and choice.fp32_modules == [] and 0.5 < choice.quality <= 1.0001
    assert all(name.startswith("encoder.layer.") for name in choice.fp32_modules)


def test_distill_child_has_fewer_layers_and_resumes_identically(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = {"student_layers": 2, **TRAIN_OPTIONS}
    full = optimize(registry, tmp_path / "a", "distill", options=options)
    labels = registry.train_result.labels  # type: ignore[attr-defined]
    check_child(full, labels, ["Great kettle.", "Awful film."])
    assert full.artifact_dir is not None
    config = json.loads((Path(full.artifact_dir) / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert full.recipe.steps[-1].resolved["teacher_layers"] == [0, 2]
    assert full.steps == 8 and full.resumed_from_step is None  # 60 training rows, batches of 16, 2 epochs

    monkeypatch.setattr(opt, "CHECKPOINT_EVERY_S", 0.0)
    work = tmp_path / "b"

    def die_at_step_6(progress: dict[str, Any]) -> None:
        if progress.get("step") == 6:
            raise Interrupted()

    params = OptimizeParams.model_validate(
        {"model": "tiny:1", "method": "distill", "dataset_id": "reviews", "options": options}
    )
    with pytest.raises(Interrupted):
        run_optimize(params, registry.ctx(work_dir=work, attempt=1, report=die_at_step_6))
    resumed = run_optimize(params, registry.ctx(work_dir=work, attempt=2))
    assert resumed.resumed_from_step == 6
    assert resumed.artifact_dir == str(work / "model-2")
    from safetensors.torch import load_file

    a = load_file(str(Path(full.artifact_dir) / "model.safetensors"))
    b = load_file(str(Path(resumed.artifact_dir) / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert resumed.metrics["train_loss"] == pytest.approx(full.metrics["train_loss"])

    # Methods compose: the distilled version, registered, quantised; the lineage shows both steps.
    registry.register("tiny", Path(full.artifact_dir))
    chained = run_optimize(
        OptimizeParams.model_validate(
            {
                "model": "tiny:2",
                "method": "quantize-int8",
                "dataset_id": "reviews",
                "options": {"calibration_texts": 16, "min_agreement": 0.5},
            }
        ),
        registry.ctx(work_dir=tmp_path / "c", attempt=1),
    )
    assert [s.method for s in chained.recipe.steps] == ["distill", "quantize-int8"]
    assert [(e.version, e.method) for e in chained.lineage] == [(1, "distill"), (2, "quantize-int8")]
    assert chained.comparison.split.source == "training-validation"  # the child carries the record
    check_child(chained, labels, ["Great kettle."])
    # ... and a quantised version is not optimised further.
    registry.register("tiny", Path(str(chained.artifact_dir)))
    with pytest.raises(UnsupportedRecipe):
        run_optimize(
            OptimizeParams.model_validate(
                {"model": "tiny:3", "method": "prune-ffn", "dataset_id": "reviews"}
            ),
            registry.ctx(work_dir=tmp_path / "d", attempt=1),
        )
    registry.versions["tiny"] = registry.versions["tiny"][:1]


def test_prune_ffn_child_loads_with_a_standard_bert_config(registry: Registry, tmp_path: Path) -> None:
    from transformers import AutoModel, BertConfig

    result = optimize(
        registry,
        tmp_path,
        "prune-ffn",
        options={"keep_fraction": 0.5, "recovery_epochs": 1, "batch_size": 16},
    )
    labels = registry.train_result.labels  # type: ignore[attr-defined]
    check_child(result, labels, ["Great kettle.", "Awful film."])
    assert result.artifact_dir is not None
    config = BertConfig.from_pretrained(result.artifact_dir)
    assert config.intermediate_size == 32 and config.num_hidden_layers == 4
    bert = AutoModel.from_config(config, add_pooling_layer=False)
    from safetensors.torch import load_file

    weights = load_file(str(Path(result.artifact_dir) / "model.safetensors"))
    bert.load_state_dict(
        {k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")}
    )
    # Half of 4 x 2 x 32 x 64 FFN weights go; the 30522 x 32 word embeddings dominate this tiny model.
    assert result.comparison.child.size.parameters == result.comparison.parent.size.parameters - 4 * (
        2 * 32 * 32 + 32
    )
    assert result.steps == 4 and result.recipe.steps[-1].resolved["importance"] == "taylor"


def test_prune_and_distill_helpers() -> None:
    assert opt.student_layer_indices(6, 3) == [0, 2, 4]
    assert opt.student_layer_indices(6, 2) == [0, 3]
    assert opt.student_layer_indices(12, 4) == [0, 3, 6, 9]
    with pytest.raises(ValueError):
        opt.student_layer_indices(6, 7)


# --- embedders ---------------------------------------------------------------------------------


def test_int8_embedder_of_the_shipped_minilm(registry: Registry, tmp_path: Path) -> None:
    params = OptimizeParams.model_validate(
        {
            "model": "all-MiniLM-L6-v2",
            "method": "quantize-int8",
            "dataset_id": "texts",
            "model_name": "minilm-int8",
            "options": {"calibration_texts": 16, "max_fp32_layers": 0},
        }
    )
    result = run_optimize(params, registry.ctx(work_dir=tmp_path, attempt=1))
    assert result.kind == "embedder" and result.labels == [] and result.model == "minilm-int8"
    assert result.parent.name == minilm.MODEL_NAME and result.parent.version == 0
    cos = result.comparison.ratios["mean_cosine"]
    assert cos is not None and 0.9 < cos <= 1.0
    assert result.recipe.steps[0].resolved["fp32_modules"] == []
    assert result.artifact_dir is not None
    child = opt.load_model(result.artifact_dir)
    assert isinstance(child, minilm.Encoder)
    vectors = minilm.embed_texts(child, ["a kettle", "a film"])
    assert vectors.shape == (2, minilm.DIM)
    assert child.nbytes() < minilm.load_encoder().nbytes() * 0.7

    registry.register("minilm-int8", Path(result.artifact_dir))
    evaluated = run_evaluate(EvaluateParams(model="minilm-int8", dataset_id="texts"), registry.ctx())
    assert evaluated.kind == "embedder" and evaluated.classifier is None
    assert evaluated.cosine_to_parent is not None and evaluated.cosine_to_parent.mean_cosine == pytest.approx(
        cos, abs=1e-4
    )
    assert evaluated.split.source == "training-validation"  # optimize recorded the dataset's fixed fifth


def test_distilled_embedder_trains_on_teacher_embeddings(registry: Registry, tmp_path: Path) -> None:
    params = OptimizeParams.model_validate(
        {
            "model": "tiny-emb",
            "method": "distill",
            "dataset_id": "texts",
            "options": {"student_layers": 2, "epochs": 1, "batch_size": 16, "loss": "cosine"},
        }
    )
    result = run_optimize(params, registry.ctx(work_dir=tmp_path, attempt=1))
    assert result.comparison.child.cosine_to_parent is not None
    assert -1 <= result.comparison.child.cosine_to_parent.mean_cosine <= 1
    assert result.steps == 2 and result.model == "tiny-emb" and result.kind == "embedder"
    assert result.artifact_dir is not None
    child = opt.load_model(result.artifact_dir)
    assert isinstance(child, opt.OptimizedEncoder) and len(child.model.encoder.layer) == 2
    assert minilm.embed_texts(child, ["a kettle"]).shape == (1, 32)


# --- devices and recipes -------------------------------------------------------------------------


def test_int8_on_cuda_is_a_typed_error_or_served_on_cpu() -> None:
    recipe = Recipe(steps=[Step(method="quantize-int8", at_load=True)])
    with pytest.raises(UnsupportedRecipe) as info:
        apply_recipe(object(), recipe, "cuda:0")
    assert info.value.error_type == "UnsupportedRecipe"
    assert serving_device(recipe, "cuda:0") == ("cpu", False)
    half = Recipe(steps=[Step(method="quantize-fp16", at_load=True)])
    assert serving_device(half, "cpu") == ("cpu", True)
    with pytest.raises(UnsupportedRecipe):
        apply_recipe(object(), half, "cpu")


def test_half_precision_is_for_gpu_workers(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedRecipe, match="GPU"):
        optimize(registry, tmp_path, "quantize-bf16")
    # The weights a bf16 recipe stores, loaded on a CPU: run in fp32, predictions still valid.
    model = opt.load_model(registry.resolve("tiny").path, fp32=True)
    recipe = Recipe(steps=[Step(method="quantize-bf16", at_load=True)])
    opt.save_model(opt.half_precision_weights(model, "quantize-bf16"), tmp_path / "bf16", recipe, {})
    loaded = opt.load_model(tmp_path / "bf16")
    assert isinstance(loaded, clf.TextClassifier) and isinstance(model, clf.TextClassifier)
    assert next(loaded.encoder.parameters()).dtype.is_floating_point
    assert {label for label, _ in clf.predict(loaded, ["Great kettle."])} <= set(model.labels)
    assert (tmp_path / "bf16" / "model.safetensors").stat().st_size < model.nbytes() * 0.6


# --- bad input -------------------------------------------------------------------------------------


def base(**kw: Any) -> dict[str, Any]:
    return {"model": "tiny", "method": "distill", "dataset_id": "reviews"} | kw


@pytest.mark.parametrize(
    ("data", "loc"),
    [
        (base(method="sparsify"), ("method",)),
        (base(method="prune-ffn", options={"keep_fraction": 1.0}), ("options", "prune-ffn", "keep_fraction")),
        (base(method="prune-ffn", options={"keep_fraction": 0}), ("options", "prune-ffn", "keep_fraction")),
        (
            base(method="prune-ffn", options={"recovery_epochs": -1}),
            ("options", "prune-ffn", "recovery_epochs"),
        ),
        (base(options={"student_layers": 0}), ("options", "distill", "student_layers")),
        (base(options={"temperature": 0.5}), ("options", "distill", "temperature")),
        (base(options={"keep_fraction": 0.5}), ("options", "distill", "keep_fraction")),
        (base(method="quantize-int8", options={"min_cosine": 2}), ("options", "quantize-int8", "min_cosine")),
        (base(method="quantize-fp16", options={"x": 1}), ("options", "half", "x")),
        (base(model="all-MiniLM-L6-v2"), ("model_name",)),
        (base(model="../x"), ("model",)),
        (base(model_name="Bad Name"), ("model_name",)),
        (base(dataset_id=""), ("dataset_id",)),
    ],
)
def test_invalid_input_is_an_error_at_its_field(data: dict[str, Any], loc: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        OptimizeParams.model_validate(data)
    assert {e["loc"][: len(loc)] for e in info.value.errors()} == {loc}


def test_params_round_trip_through_their_stored_json() -> None:
    p = OptimizeParams.model_validate(base(method="prune-ffn", options={"keep_fraction": 0.25}))
    stored = p.model_dump(mode="json")
    assert "method" not in stored["options"] and stored["options"]["keep_fraction"] == 0.25
    assert OptimizeParams.model_validate(stored) == p
    with pytest.raises(ValidationError, match="split"):
        EvaluateParams.model_validate({"model": "sentiment", "dataset_id": "d", "split": "train"})


def test_classifier_with_unlabelled_rows_is_refused_naming_the_dataset(
    registry: Registry, tmp_path: Path
) -> None:
    params = OptimizeParams.model_validate(base(dataset_id="unlabelled"))
    with pytest.raises(JobError) as info:
        run_optimize(params, registry.ctx(work_dir=tmp_path, attempt=1))
    assert info.value.error_type == "InvalidDataset" and re.match("dataset_id", info.value.message)
    errors = check_dataset(params, "classifier", registry.datasets["unlabelled"])
    assert errors[0]["loc"] == ["dataset_id"]
    with pytest.raises(JobError, match="student_layers"):
        optimize(registry, tmp_path, "distill", options={"student_layers": 4})
