"""Prompt loading and tokenization with the shipped tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from pipeline.errors import PipelineError
from pipeline.prompts import check_prompt_lengths, default_prompt_id, load_prompts
from tests.conftest import TINY_P0


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_P0)


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_text_prompts_get_bos_and_ids(tmp_path: Path, tokenizer) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"id": "a", "text": "One day,"}, {"text": "Long ago,"}])
    first, second = load_prompts(path, tokenizer)
    assert first.prompt_id == "a"
    assert first.token_ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(first.token_ids[1:]) == "One day,"
    # No id: a hash of the prompt, the same in every run.
    assert second.prompt_id == default_prompt_id("Long ago,")
    assert second.prompt_id == load_prompts(path, tokenizer)[1].prompt_id


def test_chat_prompts_use_the_chat_template(tmp_path: Path, tokenizer) -> None:
    messages = [{"role": "user", "content": "Tell me a story."}]
    (prompt,) = load_prompts(
        _jsonl(tmp_path / "c.jsonl", [{"id": "c", "messages": messages}]), tokenizer
    )
    assert tokenizer.decode(prompt.token_ids) == "<|bos|>user: Tell me a story.\nassistant:"
    # The template writes BOS itself: exactly one BOS.
    assert prompt.token_ids.count(tokenizer.bos_token_id) == 1


def test_parquet_prompts(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": ["x", "y"], "text": ["One day,", "Last summer,"]}), path)
    assert [p.prompt_id for p in load_prompts(path, tokenizer)] == ["x", "y"]


def test_limit(tmp_path: Path, tokenizer) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"text": f"Story {i}"} for i in range(5)])
    assert len(load_prompts(path, tokenizer, limit=2)) == 2


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], "already used by record 1"),
        ([{"text": ""}], "`text` must be a non-empty string"),
        ([{"text": "x", "messages": [{"role": "user", "content": "y"}]}], "exactly one of"),
        ([{"messages": [{"role": "user"}]}], "`messages` must be a non-empty list"),
        ([{"id": [1], "text": "x"}], "`id` must be a string or an integer"),
    ],
)
def test_bad_records(tmp_path: Path, tokenizer, records: list[dict], message: str) -> None:
    with pytest.raises(PipelineError, match="record") as caught:
        load_prompts(_jsonl(tmp_path / "p.jsonl", records), tokenizer)
    assert message in str(caught.value)


def test_bad_files(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(PipelineError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl", tokenizer)
    (tmp_path / "p.csv").write_text("id,text\n")
    with pytest.raises(PipelineError, match=r"unknown format '\.csv'"):
        load_prompts(tmp_path / "p.csv", tokenizer)
    (tmp_path / "p.parquet").write_text("not parquet")
    with pytest.raises(PipelineError, match="not readable Parquet"):
        load_prompts(tmp_path / "p.parquet", tokenizer)
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(PipelineError, match="line 1: expected a JSON object"):
        load_prompts(tmp_path / "list.jsonl", tokenizer)


def test_length_check_counts_the_scoring_position(tmp_path: Path, tokenizer) -> None:
    (prompt,) = load_prompts(
        _jsonl(tmp_path / "p.jsonl", [{"id": "q", "text": "One day,"}]), tokenizer
    )
    n = len(prompt.token_ids)
    check_prompt_lengths([prompt], max_tokens=10, max_model_len=n + 11)
    with pytest.raises(PipelineError, match="prompt 'q' has"):
        check_prompt_lengths([prompt], max_tokens=10, max_model_len=n + 10)
