"""Model directories, checkpoints and files sealed with a tenant's data key (tensorq.core.sealed_files):
every saver and loader round-trips through SealedFiles to identical outputs, nothing on disk is
plaintext, and a file that was tampered with or moved does not open (DataIntegrityError)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch

from tasks import classifier as clf
from tasks import minilm
from tasks import mlm as mlm_lib
from tasks import optimizing as opt
from tasks.recipes import Recipe
from tasks.train_text_classifier import load_checkpoint, save_checkpoint
from tensorq.core.artifacts import ArtifactStore
from tensorq.core.crypto import MAGIC, DataIntegrityError, DataKey, TenantCipher
from tensorq.core.sealed_files import PLAIN, SealedFiles

TEXTS = ["A fine kettle, works well.", "Awful film, I walked out.", "meh", "the [MASK] was good"]
CANARY = "canary-label-7f3a"


def cipher(tenant: str, key: DataKey) -> TenantCipher:
    return TenantCipher(tenant, lambda: key, lambda v: key if v == key.version else _missing(v))


def _missing(version: int) -> DataKey:
    raise KeyError(version)


@pytest.fixture(scope="module")
def key() -> DataKey:
    return DataKey.of(1, os.urandom(32))


@pytest.fixture
def files(tmp_path: Path, key: DataKey) -> SealedFiles:
    return SealedFiles(ArtifactStore(tmp_path), cipher("acme", key))


@pytest.fixture(scope="module")
def classifier() -> clf.TextClassifier:
    torch.manual_seed(0)
    model = clf.build_classifier(["negative", CANARY], 64)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # outputs that differ per label
    model.train(False)
    return model


def assert_sealed_dir(path: Path) -> None:
    names = {p.name for p in path.iterdir()}
    assert not any(n.startswith("tokenizer") or n in ("vocab.txt", "special_tokens_map.json") for n in names)
    for p in path.iterdir():
        data = p.read_bytes()
        assert data.startswith(MAGIC), p
        assert CANARY.encode() not in data and b"model_type" not in data and b"__metadata__" not in data


def test_classifier_round_trip_gives_identical_outputs(
    classifier: clf.TextClassifier, files: SealedFiles, tmp_path: Path
) -> None:
    out = clf.save_classifier(classifier, tmp_path / "models" / "c1", files)
    assert {p.name for p in out.iterdir()} == {"classifier.json", "config.json", "model.safetensors"}
    assert_sealed_dir(out)
    loaded = clf.load_classifier(out, "cpu", files)
    assert loaded.labels == ["negative", CANARY]
    with torch.inference_mode():
        assert torch.equal(loaded.logits(TEXTS), classifier.logits(TEXTS))
    assert clf.predict(loaded, TEXTS) == clf.predict(classifier, TEXTS)


def test_mlm_and_its_encoder_round_trip(files: SealedFiles, tmp_path: Path) -> None:
    torch.manual_seed(0)
    mlm = mlm_lib.build_mlm_from_minilm()
    mlm.model.eval()
    out = mlm_lib.save_mlm(mlm, tmp_path / "models" / "m1", files)
    assert {p.name for p in out.iterdir()} == {"encoder.json", "config.json", "model.safetensors"}
    assert_sealed_dir(out)
    loaded = mlm_lib.load_mlm(out, "cpu", files)
    mlm_lib.check_tied(loaded.model)
    batch = mlm.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(loaded.model(**batch).logits, mlm.model(**batch).logits)
    encoder = mlm_lib.load_encoder_from_dir(out, "cpu", files)
    with torch.inference_mode():
        want = mlm.model.bert(**batch).last_hidden_state
        assert torch.equal(encoder.model(**batch).last_hidden_state, want)
    assert mlm_lib.is_masked_lm_dir(out, files)


def test_embedder_and_recipe_round_trip(files: SealedFiles, tmp_path: Path) -> None:
    shipped = opt.load_model(minilm.model_dir(), files=PLAIN)  # the public base: plain files
    recipe = Recipe()
    out = opt.save_model(
        shipped, tmp_path / "models" / "e1", recipe, {"training.json": '{"records": []}'}, files
    )
    assert {p.name for p in out.iterdir()} == {
        "embedder.json",
        "config.json",
        "model.safetensors",
        "recipe.json",
        "training.json",
    }
    assert_sealed_dir(out)
    loaded = opt.load_model(out, files=files)
    assert isinstance(loaded, opt.OptimizedEncoder) and loaded.recipe == recipe
    assert torch.equal(minilm.embed_texts(loaded, TEXTS), minilm.embed_texts(shipped, TEXTS))
    # Of the opened weights: the same whether sealed (with whichever data key) or not.
    plain = opt.save_model(shipped, tmp_path / "plain", recipe, {}, PLAIN)
    assert opt.weights_digest(out, files) == opt.weights_digest(plain)


def test_an_optimised_classifier_round_trips(
    classifier: clf.TextClassifier, files: SealedFiles, tmp_path: Path
) -> None:
    model = opt.OptimizedClassifier(**{f: getattr(classifier, f) for f in classifier.__dataclass_fields__})
    out = opt.save_model(model, tmp_path / "models" / "o1", Recipe(), {}, files)
    assert_sealed_dir(out)
    loaded = opt.load_model(out, files=files)
    assert isinstance(loaded, opt.OptimizedClassifier)
    with torch.inference_mode():
        assert torch.equal(loaded.logits(TEXTS), classifier.logits(TEXTS))


def test_a_flipped_byte_in_the_weights_does_not_open(
    classifier: clf.TextClassifier, files: SealedFiles, tmp_path: Path
) -> None:
    out = clf.save_classifier(classifier, tmp_path / "models" / "c2", files)
    weights = out / clf.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(DataIntegrityError, match=r"model\.safetensors of tenant 'acme'"):
        clf.load_classifier(out, "cpu", files)


def test_a_truncated_file_does_not_open(
    classifier: clf.TextClassifier, files: SealedFiles, tmp_path: Path
) -> None:
    out = clf.save_classifier(classifier, tmp_path / "models" / "c3", files)
    config = out / clf.CONFIG_FILE
    config.write_bytes(config.read_bytes()[:-1])
    with pytest.raises(DataIntegrityError):
        clf.load_classifier(out, "cpu", files)


def test_a_sealed_directory_copied_elsewhere_does_not_open(
    classifier: clf.TextClassifier, files: SealedFiles, tmp_path: Path
) -> None:
    out = clf.save_classifier(classifier, tmp_path / "models" / "c4", files)
    copy = tmp_path / "models" / "c5"
    shutil.copytree(out, copy)
    with pytest.raises(DataIntegrityError, match=r"file:models/c5/classifier\.json"):
        clf.load_classifier(copy, "cpu", files)
    # One file swapped for another's within the directory does not open either.
    shutil.copy(out / "config.json", out / clf.CONFIG_FILE)
    with pytest.raises(DataIntegrityError):
        clf.read_config(out, files)


def test_another_tenant_cannot_open_them(
    classifier: clf.TextClassifier, files: SealedFiles, key: DataKey, tmp_path: Path
) -> None:
    out = clf.save_classifier(classifier, tmp_path / "models" / "c6", files)
    other = SealedFiles(files.store, cipher("globex", key))  # even with the very same key
    with pytest.raises(DataIntegrityError):
        clf.load_classifier(out, "cpu", other)


def test_a_plaintext_file_is_not_taken_for_a_sealed_one(
    classifier: clf.TextClassifier, files: SealedFiles, tmp_path: Path
) -> None:
    out = clf.save_classifier(classifier, tmp_path / "models" / "c7", PLAIN)
    with pytest.raises(DataIntegrityError, match="is not sealed"):
        clf.load_classifier(out, "cpu", files)


def test_an_old_directory_sealed_in_place_still_loads(
    classifier: clf.TextClassifier, files: SealedFiles, tmp_path: Path
) -> None:
    """Written before encryption at rest (tokenizer files and all), then sealed file by file, as
    `tensorq encrypt-existing` does: its weights and configs load; its tokenizer files are not read."""
    out = clf.save_classifier(classifier, tmp_path / "models" / "old", PLAIN)
    classifier.tokenizer.save_pretrained(str(out))
    for p in list(out.iterdir()):
        files.write(p, p.read_bytes())
    loaded = clf.load_classifier(out, "cpu", files)
    with torch.inference_mode():
        assert torch.equal(loaded.logits(TEXTS), classifier.logits(TEXTS))


def test_checkpoints_are_sealed_and_checked(files: SealedFiles, tmp_path: Path) -> None:
    path = tmp_path / "jobs" / str(uuid.uuid4()) / "checkpoint" / "state.pt"
    state = {"format": 1, "fingerprint": "f" * 64, "labels": [CANARY], "model": {"w": torch.arange(6.0)}}
    save_checkpoint(path, state, files)
    raw = path.read_bytes()
    assert raw.startswith(MAGIC) and CANARY.encode() not in raw
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]  # no temporary file left
    loaded = load_checkpoint(path, "f" * 64, files)
    assert loaded is not None and torch.equal(loaded["model"]["w"], torch.arange(6.0))
    assert load_checkpoint(path, "0" * 64, files) is None  # another run's: started over
    path.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(DataIntegrityError):
        load_checkpoint(path, "f" * 64, files)


def test_a_job_failing_on_a_sealed_file_is_typed() -> None:
    from db.models import Job, JobStatus
    from worker.executing import outcome_of_error

    job = Job(id=uuid.uuid4(), claim_token=uuid.uuid4())
    outcome = outcome_of_error(job, DataIntegrityError("file:models/x/model.safetensors of tenant 'acme'"))
    assert outcome.status == JobStatus.FAILED
    assert outcome.error_type == "DataIntegrityError"
    assert "model.safetensors" in (outcome.error_message or "")
