"""Alias splits, shadows, guards and history (db/rollouts.py) on a migrated SQLite database."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest
from sqlalchemy.orm import Session

from db.batching import key_of
from db.jobs import Claimant, Fill, Outcome, claim_jobs, create_job, finish_jobs
from db.models import JobStatus
from db.registry import register_version, resolve, set_alias
from db.rollouts import (
    Assignment,
    AssignmentError,
    Guard,
    NothingToRollBack,
    assign,
    check_guard,
    history,
    rollback,
    set_assignment,
    version_stats,
)
from db.session import get_sessionmaker
from worker.shadowing import agreement

T = "acme"


@pytest.fixture
def session(sqlite_url: str) -> Session:
    s = get_sessionmaker(sqlite_url)()
    for _ in range(5):
        register_version(
            s, tenant=T, name="sent", artifact_path="a", labels=["neg", "pos"], metrics={}, job_id=None
        )
    s.commit()
    return s


def test_assignment_is_deterministic_by_job_id_and_lands_near_its_split() -> None:
    a = Assignment({3: 70, 4: 30}, shadow=(5, 20))
    ids = [uuid.uuid4() for _ in range(4000)]
    picks = [a.pick(i) for i in ids]
    assert picks == [a.pick(i) for i in ids]
    versions = Counter(v for v, _ in picks)
    assert abs(versions[3] / len(ids) - 0.70) < 0.03
    shadowed = sum(s == 5 for _, s in picks) / len(ids)
    assert abs(shadowed - 0.20) < 0.03
    assert a.baseline == 3 and a.candidates == [4]
    assert Assignment({2: 50, 1: 50}).baseline == 1  # a tie: the lower version
    assert Assignment.from_json(a.to_json()) == a


def test_jobs_are_assigned_by_the_split_at_submission(session: Session) -> None:
    set_assignment(session, T, "sent", "prod", Assignment({1: 70, 2: 30}))
    session.commit()
    jid = uuid.uuid4()
    assert assign(session, T, "sent@prod", jid) == Assignment({1: 70, 2: 30}).pick(jid)
    assert assign(session, T, "sent:4", jid) == (4, None)
    assert assign(session, T, "sent", jid) == (None, None)  # latest: resolved when it runs
    assert assign(session, T, "ghost@prod", jid) == (None, None)
    assert assign(session, "other", "sent@prod", jid) == (None, None)  # another tenant's registry
    assert resolve(session, T, "sent@prod").version == 1  # the baseline, for unassigned jobs


def test_bad_assignments_change_nothing(session: Session) -> None:
    set_alias(session, T, "sent", "prod", 1)
    session.commit()
    for bad, loc in [
        (Assignment({1: 50, 9: 50}), ("split", "9")),
        (Assignment({1: 50, 2: 50}, shadow=(2, 10)), ("shadow", "version")),
        (Assignment({1: 50, 2: 50}, shadow=(9, 10)), ("shadow", "version")),
        (Assignment({1: 50, 2: 40}), ("split",)),
    ]:
        with pytest.raises(AssignmentError) as err:
            set_assignment(session, T, "sent", "prod", bad)
        assert err.value.loc == loc
        session.rollback()
    model_history = history(session, _model(session), "prod")
    assert [h.action for h in model_history] == ["set"]


def _model(session: Session):  # type: ignore[no-untyped-def]
    from db.registry import get_model

    return get_model(session, T, "sent")


def test_rollback_restores_the_previous_assignment_once(session: Session) -> None:
    set_alias(session, T, "sent", "prod", 1)
    with pytest.raises(NothingToRollBack):
        rollback(session, T, "sent", "prod", key_id=None, reason="x")
    row = set_assignment(session, T, "sent", "prod", Assignment({1: 90, 2: 10}, guard=Guard(0.05, 3)))
    seen = row.revision
    session.commit()
    rolled = rollback(session, T, "sent", "prod", key_id=None, reason="by hand", seen_revision=seen)
    assert rolled is not None and rolled.version == 1 and rolled.split is None and rolled.guard is None
    # A second checker that saw the same revision changes nothing.
    assert rollback(session, T, "sent", "prod", key_id=None, reason="again", seen_revision=seen) is None
    session.commit()
    h = history(session, _model(session), "prod")
    assert [c.action for c in h] == ["rollback", "set", "set"]
    assert h[0].reason == "by hand" and h[0].to_assignment["split"] == {"1": 100}


def _finish(session: Session, ref: str, version: int, status: JobStatus, n: int) -> None:
    jobs = [
        create_job(
            session,
            tenant=T,
            kind="classify",
            params={"model": ref, "texts": ["a"]},
            queue="inference",
            max_attempts=1,
            model=ref,
            model_version=version,
        )
        for _ in range(n)
    ]
    session.commit()
    claimed = claim_jobs(session, [j.id for j in jobs], Claimant("w", "cpu", 60))
    assert len(claimed) == n
    result = {"model": "sent", "version": version, "predictions": [{"label": "pos", "scores": {}}]}
    finish_jobs(
        session,
        [
            Outcome(j.id, j.claim_token, status, result=result if status == JobStatus.SUCCEEDED else None)  # type: ignore[arg-type]
            for j in claimed
        ],
    )
    session.commit()


def test_the_guard_rolls_a_failing_candidate_back_with_its_reason(session: Session) -> None:
    set_alias(session, T, "sent", "prod", 1)
    set_assignment(session, T, "sent", "prod", Assignment({1: 50, 2: 50}, guard=Guard(0.05, 4)))
    session.commit()
    _finish(session, "sent@prod", 2, JobStatus.FAILED, 3)
    assert check_guard(session, T, "sent@prod", 2) is None  # under min_jobs
    assert check_guard(session, T, "sent@prod", 1) is None  # the baseline is no candidate
    _finish(session, "sent@prod", 1, JobStatus.SUCCEEDED, 5)
    _finish(session, "sent@prod", 2, JobStatus.FAILED, 1)
    rolled = check_guard(session, T, "sent@prod", 2)
    assert rolled is not None and rolled.version == 1 and rolled.split is None
    session.commit()
    assert check_guard(session, T, "sent@prod", 2) is None  # no longer a candidate: rolled back once
    last = history(session, _model(session), "prod")[0]
    assert last.action == "auto-rollback" and "failed 4 of 4" in (last.reason or "")
    stats = {s["version"]: s for s in version_stats(session, T, "sent@prod", [1, 2], 3600)}
    assert stats[2]["by_status"] == {"failed": 4} and stats[2]["failure_rate"] == 1.0
    assert stats[1]["labels"] == {"pos": 5} and stats[1]["run_ms"]["sample"] == 5


def test_jobs_of_different_versions_never_share_a_batch(session: Session) -> None:
    jobs = [
        create_job(
            session,
            tenant=T,
            kind="classify",
            params={"model": "sent@prod", "texts": ["a"]},
            queue="inference",
            max_attempts=1,
            model="sent@prod",
            model_version=v,
        )
        for v in (1, 2, 1, 2, 1)
    ]
    session.commit()
    claimed = claim_jobs(session, [jobs[0].id], Claimant("w", "cpu", 60), Fill(64))
    assert sorted(j.id for j in claimed) == sorted(j.id for j in jobs if j.model_version == 1)
    session.commit()
    top_up = claim_jobs(session, [], Claimant("w", "cpu", 60), Fill(64, like=key_of(jobs[1], True)))
    assert sorted(j.id for j in top_up) == sorted(j.id for j in jobs if j.model_version == 2)


def test_agreement_of_classifiers_and_embedders() -> None:
    def labels(*names: str) -> dict[str, object]:
        return {"predictions": [{"label": n, "scores": {}} for n in names]}

    assert agreement(labels("a", "b"), labels("a", "c")) == 0.5
    assert agreement({"embeddings": [[1.0, 0.0]]}, {"embeddings": [[1.0, 1.0]]}) == pytest.approx(
        0.7071, 1e-3
    )
    assert agreement(labels("a"), {"embeddings": [[1.0]]}) is None


def test_a_submission_groups_jobs_into_messages_by_version() -> None:
    from api.routes.jobs import message_groups
    from db.models import Job

    jobs = [
        Job(
            id=uuid.uuid4(),
            tenant=T,
            kind="classify",
            queue="inference",
            model="sent@prod",
            model_version=v,
            params={"model": "sent@prod", "texts": ["a"]},
        )
        for v in (1, 2, 1, 2)
    ]
    groups = message_groups(jobs, max_texts=64)
    assert sorted(ids for _, ids, _ in groups) == sorted(
        [[str(jobs[0].id), str(jobs[2].id)], [str(jobs[1].id), str(jobs[3].id)]]
    )
