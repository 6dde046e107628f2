"""Structured logs: JSON lines off a terminal, with the job id as a field."""

from __future__ import annotations

import io
import json
import logging

import pytest

from tensorq.core.logs import configure_logging, job_context


@pytest.fixture
def captured() -> io.StringIO:
    stream = io.StringIO()
    yield stream
    logging.getLogger().handlers.clear()


def use(stream: io.StringIO, fmt: str) -> None:
    configure_logging("INFO", fmt)
    logging.getLogger().handlers[0].setStream(stream)  # type: ignore[attr-defined]


def test_json_lines_carry_the_job_id_inside_a_job_context(captured: io.StringIO) -> None:
    use(captured, "json")
    log = logging.getLogger("tensorq.test")
    log.info("outside")
    with job_context("5f0c0000-0000-0000-0000-000000000001"):
        log.warning("inside %d", 42)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
    log.info("explicit", extra={"job_id": "abc"})
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert [line.get("job_id") for line in lines] == [
        None,
        "5f0c0000-0000-0000-0000-000000000001",
        "5f0c0000-0000-0000-0000-000000000001",
        "abc",
    ]
    assert lines[1]["message"] == "inside 42" and lines[1]["level"] == "WARNING"
    assert "RuntimeError: boom" in lines[2]["exc_info"]


def test_text_lines_on_a_terminal_show_the_job(captured: io.StringIO) -> None:
    use(captured, "text")
    with job_context("j-1"):
        logging.getLogger("tensorq.test").info("hello")
    assert captured.getvalue().rstrip().endswith("hello [job=j-1]")
