"""Prompts: read a JSONL or Parquet prompt file, give each a stable id, tokenize once.

Each record holds either ``text`` (tokenized with the tokenizer's special tokens, so a
BOS is prepended where the tokenizer does that) or ``messages`` (a chat, rendered with
the tokenizer's chat template and a generation prompt). An optional ``id`` is kept as
the ``prompt_id``; without one the id is a hash of the prompt, so it is stable across
runs. The token ids made here travel unchanged to sampling and scoring.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Prompt:
    """One prompt: its stable id, its source (text or chat JSON) and its token ids."""

    prompt_id: str
    source: str
    token_ids: list[int]


def _records_from_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open() as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise PipelineError(
                    f"prompt file {path}, line {number}: not valid JSON ({err.msg})."
                ) from None
            if not isinstance(record, dict):
                raise PipelineError(
                    f"prompt file {path}, line {number}: expected a JSON object with "
                    "`text` or `messages`."
                )
            records.append(record)
    return records


def _records_from_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise PipelineError(f"prompt file {path} is not readable Parquet: {err}") from None


def _render(
    record: dict[str, Any], where: str, tokenizer: PreTrainedTokenizerBase
) -> tuple[str, list[int]]:
    text, messages = record.get("text"), record.get("messages")
    if (text is None) == (messages is None):
        raise PipelineError(
            f"{where}: needs exactly one of `text` (a string) or `messages` (a chat), "
            f"found keys {sorted(k for k, v in record.items() if v is not None)}."
        )
    if text is not None:
        if not isinstance(text, str) or not text:
            raise PipelineError(f"{where}: `text` must be a non-empty string.")
        return text, tokenizer(text)["input_ids"]
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise PipelineError(
            f"{where}: `messages` must be a non-empty list of "
            '{"role": ..., "content": ...} objects.'
        )
    if not tokenizer.chat_template:
        raise PipelineError(
            f"{where}: the prompt is a chat but the tokenizer has no chat template; "
            "give the prompt as `text`."
        )
    # The template writes the special tokens itself; tokenizing must not add them again.
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return json.dumps(messages, ensure_ascii=False), tokenizer(rendered, add_special_tokens=False)[
        "input_ids"
    ]


def default_prompt_id(source: str) -> str:
    """Stable id of a prompt without one: ``sha256:`` and 16 hex digits of its source."""
    return "sha256:" + hashlib.sha256(source.encode()).hexdigest()[:16]


def load_prompts(
    path: Path, tokenizer: PreTrainedTokenizerBase, limit: int | None = None
) -> list[Prompt]:
    """Read, validate and tokenize the prompt file at ``path``.

    Raises ``PipelineError`` for a missing or empty file, a bad line, a record with
    neither ``text`` nor ``messages``, or two prompts with the same id.
    """
    if not path.is_file():
        raise PipelineError(f"prompt file {path} does not exist.")
    if path.suffix == ".jsonl":
        records = _records_from_jsonl(path)
    elif path.suffix == ".parquet":
        records = _records_from_parquet(path)
    else:
        raise PipelineError(
            f"prompt file {path}: unknown format {path.suffix!r}; use .jsonl or .parquet."
        )
    if not records:
        raise PipelineError(f"prompt file {path} holds no prompts.")
    if limit is not None:
        records = records[:limit]
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for index, record in enumerate(records):
        where = f"prompt file {path}, record {index + 1}"
        source, token_ids = _render(record, where, tokenizer)
        raw_id = record.get("id")
        if raw_id is not None and not isinstance(raw_id, (str, int)):
            raise PipelineError(f"{where}: `id` must be a string or an integer.")
        prompt_id = str(raw_id) if raw_id is not None else default_prompt_id(source)
        if prompt_id in seen:
            raise PipelineError(
                f"{where}: prompt id {prompt_id!r} already used by record "
                f"{seen[prompt_id] + 1}; ids must be unique."
            )
        seen[prompt_id] = index
        prompts.append(Prompt(prompt_id, source, list(token_ids)))
    return prompts


def check_prompt_lengths(prompts: list[Prompt], max_tokens: int, max_model_len: int) -> None:
    """Refuse prompts that leave no room for a full completion and its scoring.

    Teacher forcing feeds prompt + completion and asks for one more token, so a prompt
    needs ``len(prompt) + max_tokens + 1 <= max_model_len``.
    """
    room = max_model_len - max_tokens - 1
    too_long = [p for p in prompts if len(p.token_ids) > room]
    if too_long:
        first = too_long[0]
        raise PipelineError(
            f"prompt {first.prompt_id!r} has {len(first.token_ids)} tokens, but with "
            f"sampling.max_tokens={max_tokens} a prompt may have at most {room} tokens "
            f"(context {max_model_len}; one position is kept for scoring). "
            f"{len(too_long)} prompt(s) are too long; shorten them, lower "
            "sampling.max_tokens or raise engine.max_model_len."
        )
