"""Prompt loading and tokenization with the shipped tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from pipeline.errors import PipelineError
from pipeline.prompts import (
    default_prompt_id,
    load_prompts,
    prompt_room,
    write_prompt_shards,
)
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
    # A prompt, a full completion of max_tokens and one scoring position must fit.
    assert prompt_room(max_tokens=10, max_model_len=n + 11) == n
    stamp = lambda index: {"shard": str(index)}  # noqa: E731
    write_prompt_shards([prompt], tmp_path / "ok", 4, 0, 10, n + 11, stamp)
    with pytest.raises(PipelineError, match="prompt 'q' has"):
        write_prompt_shards([prompt], tmp_path / "no", 4, 0, 10, n + 10, stamp)


def test_shards_are_written_one_at_a_time(tmp_path: Path, tokenizer) -> None:
    records = [{"id": f"p{i}", "text": "x" * (1 + i % 7)} for i in range(10)]
    prompts = load_prompts(_jsonl(tmp_path / "p.jsonl", records), tokenizer)
    shards = write_prompt_shards(
        iter(prompts), tmp_path / "prompts", 4, 0, 10, 1000, lambda i: {"shard": str(i)}
    )
    assert shards.sizes == [4, 4, 2]
    assert shards.longest_prompt_tokens == max(len(p.token_ids) for p in prompts)
    parts = sorted((tmp_path / "prompts").glob("part-*.parquet"))
    assert [pq.read_metadata(p).num_rows for p in parts] == [4, 4, 2]
    table = pq.read_table(parts[1])
    assert table.column("prompt_id").to_pylist() == ["p4", "p5", "p6", "p7"]
    assert table.column("prompt_token_ids").to_pylist() == [p.token_ids for p in prompts[4:8]]
    assert pq.read_schema(parts[2]).metadata[b"shard"] == b"2"


def test_duplicate_ids_are_found_across_tokenizer_batches(tmp_path: Path, tokenizer) -> None:
    # 3,000 records span three tokenizer batches; the duplicate is named by record.
    records = [{"id": str(i), "text": "One day,"} for i in range(3000)] + [
        {"id": "17", "text": "Long ago,"}
    ]
    duplicate = r"record 3001 \(line 3001\).*'17' already used by record 18"
    with pytest.raises(PipelineError, match=duplicate):
        load_prompts(_jsonl(tmp_path / "p.jsonl", records), tokenizer)


def test_file_problems_are_named(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(PipelineError, match="is a directory"):
        load_prompts(tmp_path, tokenizer)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"text": "caf\u00e9"}\n'.encode("utf-8") + b'{"text": "caf\xe9"}\n')
    with pytest.raises(PipelineError, match="line 2: not UTF-8"):
        load_prompts(latin1, tokenizer)
    with pytest.raises(PipelineError, match=r"`id` must be a string or an integer \(got True\)"):
        load_prompts(_jsonl(tmp_path / "b.jsonl", [{"id": True, "text": "x"}]), tokenizer)
