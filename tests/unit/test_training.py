"""train-text-classifier and classify as plain Python: real MiniLM fine-tuning on the shipped data."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydantic import ValidationError

from tasks import classifier as clf
from tasks import train_text_classifier as training
from tasks.classify import ClassifyParams
from tasks.classify import run as classify
from tasks.classify import run_batch as classify_batch
from tasks.context import JobCancelled, JobContext, JobError, ResolvedModel
from tasks.data import load_jsonl, sample_dataset_path
from tasks.registry import get_kind
from tasks.train_text_classifier import (
    TrainParams,
    TrainResult,
    checkpoint_path,
    load_checkpoint,
    macro_f1,
    save_checkpoint,
)
from tasks.train_text_classifier import run as train

T = TypeVar("T")

# Small enough for a couple of CPU cores: 44 training rows in batches of 8 -> 6 steps an epoch.
SETTINGS: dict[str, Any] = {
    "epochs": 2,
    "learning_rate": 3e-4,
    "batch_size": 8,
    "max_seq_length": 32,
    "validation_split": 0.25,
    "seed": 0,
    "model_name": "sentiment",
}
STEPS_PER_EPOCH = 6


class Interrupted(Exception):
    """Stands in for a worker dying mid-job."""


@dataclass
class Trained:
    result: TrainResult
    reports: list[dict[str, Any]]
    work_dir: Path


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    data = load_jsonl(sample_dataset_path())
    positive = [r for r in data if r["label"] == "positive"][:30]
    negative = [r for r in data if r["label"] == "negative"][:30]
    return positive + negative


@pytest.fixture(scope="module")
def trained(rows: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Trained:
    work_dir = tmp_path_factory.mktemp("job")
    reports: list[dict[str, Any]] = []
    result = train(
        TrainParams.model_validate({"data": rows, **SETTINGS}),
        JobContext(work_dir=work_dir, report=reports.append),
    )
    return Trained(result, reports, work_dir)


def params(**overrides: Any) -> dict[str, Any]:
    return (
        {"data": [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]} | SETTINGS | overrides
    )


# --- parameters -------------------------------------------------------------------------------


def test_shipped_dataset_is_balanced_english_reviews() -> None:
    data = load_jsonl(sample_dataset_path())
    assert len(data) == 240
    assert {r["label"] for r in data} == {"positive", "negative"}
    assert sum(r["label"] == "positive" for r in data) == 120
    assert len({r["text"] for r in data}) == 240


def test_defaults_fill_in_everything_but_the_data_and_the_name() -> None:
    p = TrainParams.model_validate({"dataset_id": "reviews-2024", "model_name": "sentiment"})
    assert (p.epochs, p.batch_size, p.max_seq_length, p.validation_split, p.seed) == (3, 16, 64, 0.2, 0)
    assert 1e-6 <= p.learning_rate <= 1e-2


@pytest.mark.parametrize(
    "name",
    ["../x", "/abs", "a/b", "%2e%2e", "..", ".", ".hidden", "Upper", "", "x" * 64, "a b", "a.b", "name\n"],
)
def test_model_name_names_cannot_reach_outside_a_directory(name: str) -> None:
    with pytest.raises(ValidationError, match="model_name"):
        TrainParams.model_validate(params(model_name=name))


@pytest.mark.parametrize("name", ["a", "sentiment", "my-model_2", "0" * 63])
def test_plain_model_names_are_accepted(name: str) -> None:
    assert TrainParams.model_validate(params(model_name=name)).model_name == name


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("epochs", 51),
        ("learning_rate", 0.0),
        ("learning_rate", 0.1),
        ("learning_rate", float("nan")),
        ("batch_size", 0),
        ("batch_size", 257),
        ("max_seq_length", 7),
        ("max_seq_length", 257),
        ("validation_split", -0.1),
        ("validation_split", 0.6),
        ("seed", -1),
        ("unknown", 1),
        ("data", [{"text": "only one", "label": "a"}]),
        ("data", [{"text": "t", "label": "a"}] * 2001),
        ("data", [{"text": "", "label": "a"}, {"text": "t", "label": "b"}]),
        ("data", [{"text": "t", "label": ""}, {"text": "t", "label": "b"}]),
        ("data", [{"text": "t", "label": "a", "weight": 2}, {"text": "t", "label": "b"}]),
    ],
)
def test_out_of_bounds_params_are_rejected(field: str, value: Any) -> None:
    with pytest.raises(ValidationError):
        TrainParams.model_validate(params(**{field: value}))


def test_exactly_one_of_dataset_id_and_data() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        TrainParams.model_validate(params(dataset_id="reviews"))
    neither = params()
    del neither["data"]
    with pytest.raises(ValidationError, match="exactly one"):
        TrainParams.model_validate(neither)


@pytest.mark.parametrize("dataset_id", ["../x", "a/b", "", " x"])
def test_dataset_ids_are_plain_tokens(dataset_id: str) -> None:
    with pytest.raises(ValidationError, match="dataset_id"):
        TrainParams.model_validate({"dataset_id": dataset_id, "model_name": "m"})


@pytest.mark.parametrize(
    "ref", ["sentiment", "sentiment:3", "sentiment@production", "a-b_c:12", "m@v2-canary"]
)
def test_classify_accepts_names_versions_and_aliases(ref: str) -> None:
    assert ClassifyParams(model=ref, texts=["hi"]).model == ref


@pytest.mark.parametrize(
    "ref",
    ["../x", "a/b", "name:0", "name:-1", "name:", "name@", "name@../x", "name:3@prod", "Name", "n\n", ""],
)
def test_classify_rejects_malformed_references(ref: str) -> None:
    with pytest.raises(ValidationError):
        ClassifyParams(model=ref, texts=["hi"])


@pytest.mark.parametrize("texts", [[], [""], ["x" * 8193], ["t"] * 257])
def test_classify_bounds_its_texts(texts: list[str]) -> None:
    with pytest.raises(ValidationError):
        ClassifyParams(model="m", texts=texts)


def test_kinds_are_registered_and_import_without_torch() -> None:
    assert get_kind("train-text-classifier").category == "training"
    assert get_kind("classify").category == "inference"
    code = "import sys, tasks.classify, tasks.train_text_classifier; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- data problems found at run time ----------------------------------------------------------


def test_a_single_label_is_an_invalid_dataset() -> None:
    # Stored rows reach the job unchecked by the schema (a dataset stored before the upload check).
    ctx = JobContext(
        load_dataset=lambda dataset_id: [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}]
    )
    with pytest.raises(JobError) as err:
        train(TrainParams(dataset_id="d1", model_name="m"), ctx)
    assert err.value.error_type == "InvalidDataset"


def test_inline_rows_with_one_label_or_too_many_are_refused_at_submission() -> None:
    from pydantic import ValidationError

    from tasks.classifier import MAX_LABELS

    one = [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}]
    many = [{"text": f"t{i}", "label": f"l{i}"} for i in range(MAX_LABELS + 1)]
    for rows, words in ((one, "at least 2"), (many, f"at most {MAX_LABELS}")):
        with pytest.raises(ValidationError, match=words):
            TrainParams.model_validate(params(data=rows))


def test_stored_rows_are_checked_like_inline_ones() -> None:
    ctx = JobContext(load_dataset=lambda dataset_id: [{"text": "fine", "label": "a"}, {"text": 3}])
    with pytest.raises(JobError) as err:
        train(TrainParams(dataset_id="d1", model_name="m"), ctx)
    assert err.value.error_type == "InvalidDataset" and "row 1" in err.value.message


def test_macro_f1_averages_per_label_scores() -> None:
    # label 0: tp=1 fp=0 fn=1 -> 2/3; label 1: tp=2 fp=1 fn=0 -> 4/5
    assert macro_f1([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx((2 / 3 + 4 / 5) / 2)


# --- training ---------------------------------------------------------------------------------


def test_training_learns_and_reports_progress(trained: Trained) -> None:
    result = trained.result
    assert result.steps == 2 * STEPS_PER_EPOCH and result.epochs == 2 and result.resumed_from_step is None
    assert (result.train_examples, result.val_examples) == (44, 16)  # 8 of each label's 30 rows held out
    metrics = result.metrics
    assert metrics.val_accuracy is not None and metrics.val_accuracy >= 0.75
    assert metrics.val_f1 is not None and metrics.val_f1 >= 0.7

    steps = [r for r in trained.reports if r.get("loss") is not None and "learning_rate" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all(r["total_steps"] == 12 and r["epochs"] == 2 for r in trained.reports)
    epoch_ends = [r for r in trained.reports if "learning_rate" not in r and r.get("loss") is not None]
    assert [r["epoch"] for r in epoch_ends] == [1, 2]
    assert all(0 <= r["val_accuracy"] <= 1 and 0 <= r["val_f1"] <= 1 for r in epoch_ends)
    assert epoch_ends[1]["loss"] < epoch_ends[0]["loss"] == pytest.approx(steps[5]["loss"])


def test_the_result_names_a_saved_classifier(trained: Trained) -> None:
    model = trained.result.model_dump(mode="json")
    assert {"model", "artifact_dir", "labels", "metrics", "version"} <= set(model)
    assert set(model["metrics"]) == {"val_accuracy", "val_f1", "train_loss"}
    assert model["model"] == "sentiment" and model["labels"] == ["negative", "positive"]
    assert model["version"] is None  # the worker sets it when it registers the version
    artifact = Path(model["artifact_dir"])
    assert artifact.is_absolute() and artifact == trained.work_dir / "model"
    # No tokenizer files: every classifier uses the shipped model's tokenizer.
    assert {p.name for p in artifact.iterdir()} - {"training.json"} == {
        "classifier.json",
        "model.safetensors",
        "config.json",
    }
    assert clf.read_config(artifact).labels == ["negative", "positive"]
    assert checkpoint_path(trained.work_dir).is_file()


@dataclass
class Resumed:
    before: list[dict[str, Any]]  # progress of the run that died after its first epoch
    after: list[dict[str, Any]]  # progress of the run that picked it up
    result: TrainResult
    work_dir: Path


@pytest.fixture(scope="module")
def resumed(rows: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Resumed:
    """The same job as `trained`, its rows from a dataset store, killed after epoch 1 and run again."""
    work_dir = tmp_path_factory.mktemp("redelivered")
    before: list[dict[str, Any]] = []

    def die_after_first_epoch(progress: dict[str, Any]) -> None:
        before.append(progress)
        if progress.get("val_accuracy") is not None:
            raise Interrupted

    p = TrainParams(dataset_id="reviews", **SETTINGS)
    store = {"reviews": rows}.__getitem__
    with pytest.raises(Interrupted):
        train(p, JobContext(work_dir=work_dir, report=die_after_first_epoch, load_dataset=store))
    assert checkpoint_path(work_dir).is_file() and not (work_dir / "model").exists()

    after: list[dict[str, Any]] = []
    result = train(p, JobContext(work_dir=work_dir, report=after.append, load_dataset=store))
    return Resumed(before, after, result, work_dir)


def test_same_seed_same_numbers(trained: Trained, resumed: Resumed) -> None:
    first_epoch = [r for r in trained.reports if r["step"] <= STEPS_PER_EPOCH]
    assert resumed.before == first_epoch  # every step's loss and learning rate, and the epoch's metrics


def test_an_interrupted_run_resumes_from_its_checkpoint_and_ends_the_same(
    trained: Trained, resumed: Resumed
) -> None:
    result = resumed.result
    assert result.resumed_from_step == STEPS_PER_EPOCH
    assert resumed.after[0]["step"] == STEPS_PER_EPOCH and resumed.after[0]["epoch"] == 2
    assert all(r["resumed_from_step"] == STEPS_PER_EPOCH for r in resumed.after)
    assert result.steps == 2 * STEPS_PER_EPOCH
    assert Path(result.artifact_dir) == resumed.work_dir / "model"
    # An epoch boundary holds everything: the resumed run is the uninterrupted one, number for number.
    assert result.metrics == trained.result.metrics


def test_a_run_killed_mid_epoch_resumes_from_its_last_step_checkpoint(
    trained: Trained, rows: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def die_at_step_3(progress: dict[str, Any]) -> None:
        if progress["step"] == 3:
            raise Interrupted

    p = TrainParams.model_validate({"data": rows, **SETTINGS})
    with monkeypatch.context() as m:
        m.setattr(training, "CHECKPOINT_EVERY_S", 0.0)  # a checkpoint after every step
        with pytest.raises(Interrupted):
            train(p, JobContext(work_dir=tmp_path, report=die_at_step_3))
    result = train(p, JobContext(work_dir=tmp_path))
    assert result.resumed_from_step == 3 and result.steps == 2 * STEPS_PER_EPOCH
    # The epoch's order, the dropout stream and the running loss all came back with it.
    assert result.metrics == trained.result.metrics


def test_a_checkpoint_of_other_data_or_settings_is_ignored(tmp_path: Path) -> None:
    path = checkpoint_path(tmp_path)
    save_checkpoint(path, {"format": 1, "fingerprint": "abc", "progress": {}})
    assert load_checkpoint(path, "abc") is not None
    assert load_checkpoint(path, "other") is None
    path.write_bytes(b"torn")
    assert load_checkpoint(path, "abc") is None
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]  # no temp files left behind


def test_cancelling_stops_training_between_steps(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    checks = iter(range(1_000_000))
    ctx = JobContext(work_dir=tmp_path, cancel_requested=lambda: next(checks) >= 2)
    with pytest.raises(JobCancelled):
        train(TrainParams.model_validate({"data": rows, **SETTINGS}), ctx)
    assert not (tmp_path / "model").exists()


def test_without_a_validation_split_there_are_no_validation_metrics() -> None:
    data = [{"text": "great", "label": "pos"}, {"text": "awful", "label": "neg"}] * 2
    p = TrainParams.model_validate(params(data=data, epochs=1, validation_split=0.0))
    result = train(p, JobContext())  # no work_dir: no checkpoints, the model goes to a temp dir
    try:
        assert (result.train_examples, result.val_examples, result.steps) == (4, 0, 1)
        assert result.metrics.val_accuracy is None and result.metrics.val_f1 is None
        assert clf.read_config(Path(result.artifact_dir)).labels == ["neg", "pos"]
    finally:
        shutil.rmtree(result.artifact_dir)


# --- classify ---------------------------------------------------------------------------------


class CountingCache:
    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.entries: dict[str, Any] = {}

    def get(self, key: str, load: Callable[[], T]) -> T:
        if key not in self.entries:
            self.loaded.append(key)
            self.entries[key] = load()
        result: T = self.entries[key]
        return result


def test_classify_labels_texts_with_the_trained_model(trained: Trained) -> None:
    artifact = Path(trained.result.artifact_dir)
    cache = CountingCache()
    asked: list[str] = []

    def resolve(ref: str) -> ResolvedModel:
        asked.append(ref)
        return ResolvedModel(name="sentiment", version=3, path=artifact)

    ctx = JobContext(models=cache, resolve_model=resolve)
    texts = [
        "The kettle works perfectly. I recommend it to everyone.",
        "Avoid this one. The thriller was boring and far too long.",
        "Five stars. The documentary made me laugh and cry.",
    ]
    result = classify(ClassifyParams(model="sentiment@production", texts=texts), ctx)
    assert (result.model, result.version, asked) == ("sentiment", 3, ["sentiment@production"])
    assert len(result.predictions) == 3
    for prediction in result.predictions:
        assert set(prediction.scores) == {"negative", "positive"}
        assert math.isclose(sum(prediction.scores.values()), 1.0, abs_tol=1e-5)
        assert prediction.label == max(prediction.scores, key=prediction.scores.__getitem__)
    assert [p.label for p in result.predictions] == ["positive", "negative", "positive"]

    classify(ClassifyParams(model="sentiment@production", texts=texts[:1]), ctx)
    assert cache.loaded == [f"classifier:{artifact}@cpu"]
    assert cache.entries[f"classifier:{artifact}@cpu"].nbytes() > 50_000_000


def test_a_batch_of_classify_jobs_resolves_each_reference_once(trained: Trained, tmp_path: Path) -> None:
    paths = {"a": Path(trained.result.artifact_dir), "b": tmp_path / "b"}
    paths["b"].symlink_to(paths["a"], target_is_directory=True)  # another version's files
    asked: list[str] = []

    def resolve(ref: str) -> ResolvedModel:
        asked.append(ref)
        name = ref.split("@")[0]
        return ResolvedModel(name=name, version=len(asked), path=paths[name])

    cache = CountingCache()
    batch = [
        ClassifyParams(model="a", texts=["Five stars.", "One star."]),
        ClassifyParams(model="b@prod", texts=["Never again."]),
        ClassifyParams(model="a", texts=["I love it."]),
    ]
    results = classify_batch(batch, JobContext(models=cache, resolve_model=resolve))
    assert asked == ["a", "b@prod"]
    assert cache.loaded == [f"classifier:{paths['a']}@cpu", f"classifier:{paths['b']}@cpu"]
    assert [(r.model, r.version, len(r.predictions)) for r in results] == [
        ("a", 1, 2),
        ("b", 2, 1),
        ("a", 1, 1),
    ]


def test_one_model_name_in_two_tenants_is_two_cached_models(trained: Trained, tmp_path: Path) -> None:
    """Each tenant's registry resolves "sentiment:1" to its own files; the shared cache keeps them apart."""
    other = tmp_path / "other-tenant-model"
    other.symlink_to(Path(trained.result.artifact_dir), target_is_directory=True)
    cache = CountingCache()
    for path in (Path(trained.result.artifact_dir), other):
        ctx = JobContext(
            models=cache, resolve_model=lambda ref, p=path: ResolvedModel(name="sentiment", version=1, path=p)
        )
        classify(ClassifyParams(model="sentiment", texts=["Five stars."]), ctx)
    assert len(cache.loaded) == 2 and len(set(cache.loaded)) == 2


def test_classify_refuses_a_directory_that_is_not_a_classifier(tmp_path: Path) -> None:
    ctx = JobContext(resolve_model=lambda ref: ResolvedModel(name="m", version=1, path=tmp_path))
    with pytest.raises(JobError) as err:
        classify(ClassifyParams(model="m", texts=["hi"]), ctx)
    assert err.value.error_type == "InvalidModel"
