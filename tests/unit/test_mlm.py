"""Masked-LM pretraining and fill-mask as plain Python: real MiniLM on the generated domain corpus.

Kept small for a couple of shared CPU cores: 200 texts (180 to train on), 32 tokens, batches of 16
-> 12 steps an epoch, 2 epochs, one thread.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from tasks import classifier as clf
from tasks import minilm, pretrain_mlm
from tasks import mlm as mlm_lib
from tasks.context import JobCancelled, JobContext, JobError, ResolvedModel
from tasks.data import load_jsonl
from tasks.data import make_domain_corpus as corpus
from tasks.fill_mask import FillMaskParams, batch_cost
from tasks.fill_mask import run as fill
from tasks.fill_mask import run_batch as fill_batch
from tasks.pretrain_mlm import PretrainParams, PretrainResult, run_pretrain

TEXTS = 200
SETTINGS: dict[str, Any] = {
    "dataset_id": "domain",
    "model_name": "domain-encoder",
    "epochs": 2,
    "batch_size": 16,
    "learning_rate": 5e-4,
    "max_length": 32,
    "seed": 0,
}
STEPS_PER_EPOCH = 12
KILL_AT_STEP = 17  # mid-way through the second epoch
# Each asks for the crop; the first follows a corpus template, the other two no template of it.
PROBES = [
    "farmers harvest the [MASK] in autumn.",
    "in the valley the villagers grow the [MASK] in wet soil.",
    "the [MASK] is dug up and stored for the winter.",
]


class Interrupted(Exception):
    """Stands in for a worker dying mid-job."""


@dataclass
class Pretrained:
    result: PretrainResult
    reports: list[dict[str, Any]]
    work_dir: Path


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return corpus.domain_rows(TEXTS)


def context(rows: list[dict[str, Any]], work_dir: Path | None = None, **kw: Any) -> JobContext:
    return JobContext(load_dataset=lambda _: rows, work_dir=work_dir, **kw)


@pytest.fixture(scope="module")
def pretrained(rows: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Pretrained:
    work_dir = tmp_path_factory.mktemp("job")
    reports: list[dict[str, Any]] = []
    result = run_pretrain(
        PretrainParams.model_validate(SETTINGS), context(rows, work_dir, attempt=1, report=reports.append)
    )
    drop_checkpoint(work_dir)
    return Pretrained(result, reports, work_dir)


def drop_checkpoint(work_dir: Path) -> None:
    """A checkpoint of MiniLM and its AdamW state is ~270 MB: not left in a shared /tmp."""
    shutil.rmtree(pretrain_mlm.checkpoint_path(work_dir).parent, ignore_errors=True)


@pytest.fixture(scope="module")
def fresh() -> mlm_lib.MaskedLM:
    torch.manual_seed(0)
    return mlm_lib.build_mlm_from_minilm()


@pytest.fixture(scope="module")
def tokenizer(fresh: mlm_lib.MaskedLM) -> Any:
    return fresh.tokenizer


def resolver(**dirs: Path | str) -> Any:
    def resolve(ref: str) -> ResolvedModel:
        name = ref.split(":")[0]
        if name not in dirs:
            raise JobError("ModelNotFound", ref)
        return ResolvedModel(name=name, version=1, path=Path(dirs[name]))

    return resolve


# --- masking -------------------------------------------------------------------------------------


def masked_sample(
    tokenizer: Any, whole_word: bool, seed: int = 1
) -> list[tuple[list[mlm_lib.Tokenized], mlm_lib.MaskedBatch]]:
    """3000 domain sentences masked in batches of 64: (the batch's texts, the masked batch)."""
    items = mlm_lib.tokenize(tokenizer, corpus.domain_texts(3000, seed=5), 64)
    collate = mlm_lib.MaskingCollator(tokenizer, torch.Generator().manual_seed(seed), whole_word=whole_word)
    chunks = [items[i : i + 64] for i in range(0, len(items), 64)]
    return [(chunk, collate(chunk)) for chunk in chunks]


def originals(
    items: list[mlm_lib.Tokenized], shape: torch.Size, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full(shape, pad, dtype=torch.long)
    words = torch.full(shape, -1, dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, : len(item.input_ids)] = torch.tensor(item.input_ids)
        words[row, : len(item.word_ids)] = torch.tensor([-1 if w is None else w for w in item.word_ids])
    return ids, words


@pytest.mark.parametrize("whole_word", [False, True])
def test_masking_follows_the_80_10_10_rule_and_never_touches_specials(
    tokenizer: Any, whole_word: bool
) -> None:
    pairs = masked_sample(tokenizer, whole_word)
    special = torch.tensor(sorted(tokenizer.all_special_ids))
    selected = candidates = masked = randomised = kept = 0
    for items, batch in pairs:
        ids, words = originals(items, batch.input_ids.shape, tokenizer.pad_token_id)
        chosen = batch.labels != mlm_lib.IGNORE_INDEX
        assert torch.equal(batch.labels[chosen], ids[chosen])
        assert not torch.isin(ids[chosen], special).any()  # never [CLS], [SEP] or [PAD]
        assert torch.equal(batch.input_ids[~chosen], ids[~chosen])  # nothing else changes
        assert not torch.isin(
            batch.input_ids[chosen & (batch.input_ids != tokenizer.mask_token_id)], special
        ).any()
        selected += int(chosen.sum())
        candidates += int((words >= 0).sum())
        masked += int((chosen & (batch.input_ids == tokenizer.mask_token_id)).sum())
        kept += int((chosen & (batch.input_ids == ids)).sum())
        randomised += int(
            (chosen & (batch.input_ids != ids) & (batch.input_ids != tokenizer.mask_token_id)).sum()
        )
    assert candidates > 30_000
    assert abs(selected / candidates - 0.15) < 0.012
    assert abs(masked / selected - 0.8) < 0.03
    assert abs(randomised / selected - 0.1) < 0.025
    assert abs(kept / selected - 0.1) < 0.025


def test_whole_word_masking_masks_every_piece_of_a_word(tokenizer: Any) -> None:
    pairs = masked_sample(tokenizer, whole_word=True)
    multi_piece_words = 0
    for items, batch in pairs:
        _, words = originals(items, batch.input_ids.shape, tokenizer.pad_token_id)
        chosen = batch.labels != mlm_lib.IGNORE_INDEX
        is_mask = batch.input_ids == tokenizer.mask_token_id
        for row in range(len(items)):
            for w in set(words[row].tolist()) - {-1}:
                at = words[row] == w
                # All of the word or none of it; [MASK]ed, then on all its pieces.
                assert chosen[row][at].all() or not chosen[row][at].any()
                assert is_mask[row][at].all() or not is_mask[row][at].any()
                if int(at.sum()) > 1 and chosen[row][at].all():
                    multi_piece_words += 1
    assert multi_piece_words > 100  # zorbleberry, grindlevane, vellmoor, ...


def test_word_pieces_without_word_ids(tokenizer: Any) -> None:
    ids = tokenizer("the zorbleberry grows")["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    words = mlm_lib._words_from_pieces(pieces, [i in tokenizer.all_special_ids for i in ids])
    assert words == mlm_lib.tokenize(tokenizer, ["the zorbleberry grows"], 32)[0].word_ids
    assert words[0] is None and words[-1] is None and len(set(words[2:-2])) == 1


def test_masking_is_deterministic_and_resumable_from_the_generator_state(tokenizer: Any) -> None:
    items = mlm_lib.tokenize(tokenizer, corpus.domain_texts(64), 32)
    a = mlm_lib.MaskingCollator(tokenizer, torch.Generator().manual_seed(3))
    b = mlm_lib.MaskingCollator(tokenizer, torch.Generator().manual_seed(3))
    first_a, first_b = a(items[:32]), b(items[:32])
    assert torch.equal(first_a.input_ids, first_b.input_ids) and torch.equal(first_a.labels, first_b.labels)
    state = a.generator.get_state()
    second = a(items[32:])
    c = mlm_lib.MaskingCollator(tokenizer, torch.Generator())
    c.generator.set_state(state)
    assert torch.equal(c(items[32:]).input_ids, second.input_ids)
    other = mlm_lib.MaskingCollator(tokenizer, torch.Generator().manual_seed(4))(items[:32])
    assert not torch.equal(other.labels, first_a.labels)


def test_a_batch_always_has_a_masked_position(tokenizer: Any) -> None:
    items = mlm_lib.tokenize(tokenizer, ["one"], 8)
    collate = mlm_lib.MaskingCollator(tokenizer, torch.Generator().manual_seed(0), mask_probability=0.01)
    for _ in range(20):
        batch = collate(items)
        assert int((batch.labels != mlm_lib.IGNORE_INDEX).sum()) >= 1


# --- the model directory -------------------------------------------------------------------------


def test_save_and_load_round_trip_keeps_outputs_and_ties(fresh: mlm_lib.MaskedLM, tmp_path: Path) -> None:
    path = mlm_lib.save_mlm(fresh, tmp_path / "enc")
    assert json.loads((path / "encoder.json").read_text())["task"] == "masked-lm"
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "cls.predictions.decoder.weight" not in keys and "bert.embeddings.word_embeddings.weight" in keys
    loaded = mlm_lib.load_mlm(path)
    m = loaded.model
    assert m.cls.predictions.decoder.weight.data_ptr() == m.bert.embeddings.word_embeddings.weight.data_ptr()
    assert m.cls.predictions.decoder.bias is m.cls.predictions.bias
    batch = fresh.tokenizer(["farmers harvest the [MASK] in autumn."], return_tensors="pt")
    fresh.model.eval()
    with torch.inference_mode():
        assert torch.equal(fresh.model(**batch).logits, m(**batch).logits)
    # Saving again over it is one replace: still loadable, nothing left beside it.
    mlm_lib.save_mlm(loaded, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]


def test_the_bare_encoder_embeds_as_the_shipped_model_does(fresh: mlm_lib.MaskedLM, tmp_path: Path) -> None:
    path = mlm_lib.save_mlm(fresh, tmp_path / "enc")
    encoder = mlm_lib.load_encoder_from_dir(path)
    assert not hasattr(encoder.model, "cls") and encoder.model.pooler is None
    texts = ["farmers harvest the oboe in autumn.", "a second sentence"]
    ours = minilm.embed_texts(encoder, texts)
    shipped = minilm.embed_texts(minilm.load_encoder(), texts)
    assert torch.allclose(ours, shipped, atol=1e-6)


def test_directories_without_a_masked_lm_head_are_refused(tmp_path: Path) -> None:
    classifier = clf.save_classifier(clf.build_classifier(["a", "b"], 16), tmp_path / "clf")
    for path in (classifier, minilm.model_dir(), tmp_path / "nothing"):
        assert not mlm_lib.is_masked_lm_dir(path)
        with pytest.raises(mlm_lib.MaskedLMFormatError):
            mlm_lib.load_mlm(path)
    ctx = JobContext(resolve_model=resolver(sentiment=classifier, shipped=minilm.model_dir()))
    for ref in ("sentiment", "shipped:1"):
        with pytest.raises(JobError) as err:
            fill(FillMaskParams(model=ref, texts=["a [MASK]"]), ctx)
        assert err.value.error_type == "IncompatibleModel"
    with pytest.raises(JobError) as err:
        run_pretrain(
            PretrainParams.model_validate({**SETTINGS, "base_model": "sentiment"}),
            JobContext(load_dataset=lambda _: corpus.domain_rows(10), resolve_model=ctx.resolve_model),
        )
    assert err.value.error_type == "IncompatibleModel"


# --- fill-mask input -----------------------------------------------------------------------------


def test_a_text_without_a_mask_fails_validation_at_its_index() -> None:
    with pytest.raises(ValidationError) as err:
        FillMaskParams.model_validate({"model": "m", "texts": ["a [MASK]", "b [MASK]", "no mask here"]})
    errors = err.value.errors()
    assert [e["loc"] for e in errors] == [("texts", 2)]
    assert "[MASK]" in errors[0]["msg"]
    with pytest.raises(ValidationError):
        FillMaskParams.model_validate({"model": "m", "texts": ["a [mask]"]})  # the token is case-sensitive
    bad: dict[str, Any]
    for bad in (
        {"top_k": 0},
        {"top_k": 51},
        {"top_k": "5"},
        {"texts": []},
        {"texts": ["[MASK]"] * 65},
        {"extra": 1},
    ):
        with pytest.raises(ValidationError):
            FillMaskParams.model_validate({"model": "m", "texts": ["a [MASK]"], **bad})
    params = FillMaskParams.model_validate({"model": "m:2", "texts": ["[MASK]", "a [MASK] [MASK]"]})
    assert params.top_k == 5 and batch_cost(params) == 2


def test_pretrain_params_are_strict() -> None:
    assert PretrainParams.model_validate(SETTINGS).mask_probability == 0.15
    assert PretrainParams.model_validate(SETTINGS).whole_word_masking is False
    for bad in (
        {"epochs": "2"},
        {"epochs": 0},
        {"mask_probability": 0.9},
        {"max_length": 1000},
        {"extra": 1},
        {"model_name": "Bad/Name"},
    ):
        with pytest.raises(ValidationError):
            PretrainParams.model_validate({**SETTINGS, **bad})


def test_texts_with_no_tokens_are_an_invalid_dataset(tokenizer: Any) -> None:
    rows = [{"text": "\u200b"}] * 5  # a zero-width space: the tokenizer drops it
    assert mlm_lib.tokenize(tokenizer, ["\u200b"], 8)[0].word_ids == [None, None]
    nothing = mlm_lib.MaskingCollator(tokenizer, torch.Generator())(
        mlm_lib.tokenize(tokenizer, ["\u200b"], 8)
    )
    assert not (nothing.labels != mlm_lib.IGNORE_INDEX).any()
    with pytest.raises(JobError) as err:
        run_pretrain(PretrainParams.model_validate(SETTINGS), context(rows))
    assert err.value.error_type == "InvalidDataset"


def test_rows_without_text_are_an_invalid_dataset() -> None:
    params = PretrainParams.model_validate(SETTINGS)
    for rows in ([{"text": "a"}, {"label": "x"}], [{"text": "only one"}], [{"text": ""}, {"text": "b"}]):
        with pytest.raises(JobError) as err:
            run_pretrain(params, context(rows))
        assert err.value.error_type == "InvalidDataset"


# --- pretraining ---------------------------------------------------------------------------------


def test_pretraining_lowers_heldout_perplexity(pretrained: Pretrained) -> None:
    r = pretrained.result
    assert r.task == "masked-lm" and r.base_model == minilm.MODEL_NAME and r.model == "domain-encoder"
    assert (r.train_texts, r.heldout_texts) == (180, 20)
    assert r.steps == 2 * STEPS_PER_EPOCH and r.resumed_from_step is None
    assert r.metrics.perplexity_after < r.metrics.perplexity_before / 10
    assert math.isfinite(r.metrics.train_loss)
    assert Path(r.artifact_dir or "") == pretrained.work_dir / "model-1"
    assert mlm_lib.is_masked_lm_dir(pretrained.work_dir / "model-1")
    steps = [p["step"] for p in pretrained.reports]
    assert steps == sorted(steps) and steps[-1] == r.steps
    last = pretrained.reports[-1]
    assert last["total_steps"] == r.steps and last["epoch"] == 2 and last["loss"] == r.metrics.train_loss


def test_fill_mask_ranks_the_domain_word_only_after_pretraining(
    pretrained: Pretrained, fresh: mlm_lib.MaskedLM, tmp_path: Path
) -> None:
    base = mlm_lib.save_mlm(fresh, tmp_path / "fresh")
    ctx = JobContext(resolve_model=resolver(domain=pretrained.result.artifact_dir or "", fresh=base))
    before, after = fill_batch(
        [
            FillMaskParams(model="fresh", texts=PROBES),
            FillMaskParams(model="domain:1", texts=PROBES, top_k=3),
        ],
        ctx,
    )
    assert after.model == "domain" and after.version == 1
    for text in before.predictions:
        assert len(text) == 1 and len(text[0]) == 5
        assert corpus.DOMAIN_WORD not in [c.token for c in text[0]]
    for text in after.predictions:
        assert len(text[0]) == 3
        assert corpus.DOMAIN_WORD in [c.token for c in text[0]]
        scores = [c.score for c in text[0]]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1


def test_fill_mask_answers_each_mask_in_order(
    pretrained: Pretrained, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = JobContext(resolve_model=resolver(domain=pretrained.result.artifact_dir or ""))
    texts = ["[MASK] harvest the [MASK] in autumn.", "the [MASK] grows best in the wet soil of vellmoor."]
    both = fill(FillMaskParams(model="domain", texts=texts, top_k=50), ctx)
    assert [len(t) for t in both.predictions] == [2, 1]
    assert all(len(mask) == 50 for t in both.predictions for mask in t)
    one_at_a_time = [
        fill(FillMaskParams(model="domain", texts=[t], top_k=50), ctx).predictions[0] for t in texts
    ]
    for batched, alone in zip(both.predictions, one_at_a_time, strict=True):
        for m_b, m_a in zip(batched, alone, strict=True):
            assert [c.token for c in m_b][:5] == [c.token for c in m_a][:5]
            assert [c.score for c in m_b][:5] == pytest.approx([c.score for c in m_a][:5], abs=1e-5)
    assert "[SEP]" not in [c.token for t in both.predictions for m in t for c in m]
    # Two references to one version: one group, one forward pass, each job its own answer.
    calls: list[int] = []
    real = mlm_lib.fill_mask

    def counting(mlm: mlm_lib.MaskedLM, texts: list[str], top_k: int = 5) -> Any:
        calls.append(len(texts))
        return real(mlm, texts, top_k)

    monkeypatch.setattr(mlm_lib, "fill_mask", counting)
    a, b = fill_batch(
        [FillMaskParams(model="domain", texts=texts[:1]), FillMaskParams(model="domain:1", texts=texts)], ctx
    )
    assert (
        calls == [3] and [len(t) for t in a.predictions] == [2] and [len(t) for t in b.predictions] == [2, 1]
    )


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(
    pretrained: Pretrained, rows: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports: list[dict[str, Any]] = []

    def dying(progress: dict[str, Any]) -> None:
        reports.append(progress)
        # Checkpoint mid-epoch from the step before the kill on (every step would write ~270 MB each).
        if progress["step"] == KILL_AT_STEP - 1:
            monkeypatch.setattr(pretrain_mlm, "CHECKPOINT_EVERY_S", 0.0)
        if progress["step"] == KILL_AT_STEP:
            raise Interrupted()

    params = PretrainParams.model_validate(SETTINGS)
    with pytest.raises(Interrupted):
        run_pretrain(params, context(rows, tmp_path, attempt=1, report=dying))
    assert not (tmp_path / "model-1").exists()
    monkeypatch.setattr(pretrain_mlm, "CHECKPOINT_EVERY_S", 300.0)

    resumed_reports: list[dict[str, Any]] = []
    resumed = run_pretrain(params, context(rows, tmp_path, attempt=2, report=resumed_reports.append))
    assert resumed.resumed_from_step == KILL_AT_STEP
    assert (
        resumed_reports[0]["step"] == KILL_AT_STEP and resumed_reports[0]["resumed_from_step"] == KILL_AT_STEP
    )
    assert Path(resumed.artifact_dir or "") == tmp_path / "model-2"
    reference = pretrained.result
    assert resumed.metrics == reference.metrics
    assert resumed.steps == reference.steps
    # Every later step's loss, and every weight, as in the run that was never interrupted.
    later = {p["step"]: p["loss"] for p in pretrained.reports if p["step"] > KILL_AT_STEP}
    assert {p["step"]: p["loss"] for p in resumed_reports if p["step"] > KILL_AT_STEP} == later
    from safetensors.torch import load_file

    ours = load_file(str(tmp_path / "model-2" / "model.safetensors"))
    theirs = load_file(str(Path(reference.artifact_dir or "") / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    drop_checkpoint(tmp_path)


def test_a_checkpoint_of_other_settings_is_not_resumed(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    state = {"format": pretrain_mlm.CHECKPOINT_FORMAT, "fingerprint": "something else"}
    pretrain_mlm.save_checkpoint(pretrain_mlm.checkpoint_path(tmp_path), state)
    assert pretrain_mlm.load_checkpoint(pretrain_mlm.checkpoint_path(tmp_path), "mine") is None


def test_cancelling_stops_before_training(rows: list[dict[str, Any]]) -> None:
    with pytest.raises(JobCancelled):
        run_pretrain(PretrainParams.model_validate(SETTINGS), context(rows, cancel_requested=lambda: True))


def test_pretraining_continues_from_a_registered_encoder(pretrained: Pretrained, tmp_path: Path) -> None:
    few = corpus.domain_rows(20, seed=9)
    params = PretrainParams.model_validate({**SETTINGS, "base_model": "domain:1", "epochs": 1})
    ctx = JobContext(
        load_dataset=lambda _: few,
        resolve_model=resolver(domain=pretrained.result.artifact_dir or ""),
        work_dir=tmp_path,
        attempt=1,
    )
    result = run_pretrain(params, ctx)
    assert result.base_model == "domain:1" and result.steps == 2
    # It starts from the domain weights, head included: already far below a fresh head's perplexity.
    assert result.metrics.perplexity_before < pretrained.result.metrics.perplexity_before / 10
    assert mlm_lib.load_mlm(tmp_path / "model-1").base_model == "domain:1"
    drop_checkpoint(tmp_path)


def test_perplexity_uses_the_same_masks_every_time(fresh: mlm_lib.MaskedLM) -> None:
    texts = corpus.domain_texts(20)
    a = mlm_lib.fixed_masks(fresh.tokenizer, texts, 32, seed=11)
    b = mlm_lib.fixed_masks(fresh.tokenizer, texts, 32, seed=11)
    assert all(
        torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
        for x, y in zip(a, b, strict=True)
    )
    assert mlm_lib.perplexity(fresh.model, a) == mlm_lib.perplexity(fresh.model, b)


def test_the_shipped_corpus_files_match_the_generator() -> None:
    here = Path(corpus.__file__).parent
    assert load_jsonl(here / "domain.jsonl") == corpus.domain_rows()
    assert load_jsonl(here / "domain_labelled.jsonl") == corpus.labelled_rows()
    labels = [row["label"] for row in corpus.labelled_rows()]
    assert labels.count("thriving") == labels.count("blighted") == corpus.LABELLED_PER_LABEL
    ids = [t for text in corpus.domain_texts(50) for t in text.split()]
    assert corpus.DOMAIN_WORD in ids


def test_a_classifier_starts_from_the_pretrained_encoder(pretrained: Pretrained, tmp_path: Path) -> None:
    path = pretrained.result.artifact_dir or ""
    model = mlm_lib.build_classifier_from_dir(
        path, ["blighted", "thriving"], 32, base_model="domain-encoder:1"
    )
    trained = mlm_lib.load_mlm(path).model.bert.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in model.encoder.state_dict().items())
    saved = clf.load_classifier(clf.save_classifier(model, tmp_path / "clf"))
    assert saved.base_model == "domain-encoder:1"
    texts = [row["text"] for row in corpus.labelled_rows(2)]
    for (label_a, scores_a), (label_b, scores_b) in zip(
        clf.predict(saved, texts), clf.predict(model, texts), strict=True
    ):
        assert label_a == label_b and scores_a == pytest.approx(scores_b, abs=1e-6)


def test_a_long_text_is_cut_but_never_loses_a_mask(fresh: mlm_lib.MaskedLM) -> None:
    filler = " ".join(["word"] * 600)
    first = mlm_lib.fill_mask(fresh, [f"[MASK] {filler}", "a [MASK]"], top_k=2)
    assert [len(t) for t in first] == [1, 1]
    with pytest.raises(ValueError, match="text 1 has a mask beyond token 512"):
        mlm_lib.fill_mask(fresh, ["a [MASK]", f"{filler} [MASK]"], top_k=2)
