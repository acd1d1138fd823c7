"""Prompts: stream a JSONL or Parquet prompt file, give each a stable id, tokenize once.

Each record holds either ``text`` (tokenized with the tokenizer's special tokens, so a
BOS is prepended where the tokenizer does that) or ``messages`` (a chat, rendered with
the tokenizer's chat template and a generation prompt). An optional ``id`` (a string
or an integer) is kept as the ``prompt_id``; without one the id is a hash of the
prompt, so it is stable across runs. The token ids made here travel unchanged to
sampling and scoring.

The file is read record by record (JSONL line by line, Parquet batch by batch), so a
prompt file of millions of rows is never held in memory as Python objects: the
prompts stage of a run turns it into one ``prompts/part-N`` file per shard. Only an
8-byte hash of each id is kept, to refuse duplicate ids.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import PROMPTS_SCHEMA, part_name, write_table
from pipeline.errors import PipelineError
from pipeline.provenance import sampling_seed

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Records tokenized per call of the (batched, Rust) tokenizer.
_TOKENIZE_BATCH = 1024
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Prompt:
    """One prompt: its stable id, its source (text or chat JSON) and its token ids."""

    prompt_id: str
    source: str
    token_ids: list[int]


def require_prompt_file(path: Path) -> None:
    """Refuse a prompt path that is not a readable ``.jsonl`` or ``.parquet`` file."""
    if path.is_dir():
        raise PipelineError(f"prompt file {path} is a directory; give the JSONL or Parquet file.")
    if not path.is_file():
        raise PipelineError(f"prompt file {path} does not exist.")
    if path.suffix not in (".jsonl", ".parquet"):
        raise PipelineError(
            f"prompt file {path}: unknown format {path.suffix!r}; use .jsonl or .parquet."
        )


def prompt_file_digest(path: Path) -> str:
    """SHA-256 of the prompt file's bytes (streamed), for provenance."""
    require_prompt_file(path)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _records_from_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    records = 0
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"prompt file {path}, line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise PipelineError(
                    f"{where}: not UTF-8 text ({err.reason} at byte {err.start}); save the "
                    "file as UTF-8."
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise PipelineError(f"{where}: not valid JSON ({err.msg}).") from None
            if not isinstance(record, dict):
                raise PipelineError(f"{where}: expected a JSON object with `text` or `messages`.")
            records += 1
            yield f"prompt file {path}, record {records} (line {number})", record


def _records_from_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=_TOKENIZE_BATCH)
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                row += 1
                yield f"prompt file {path}, record {row}", record
    except (OSError, ValueError) as err:  # pyarrow's errors for unreadable files
        raise PipelineError(f"prompt file {path} is not readable Parquet: {err}") from None


@dataclass(frozen=True)
class _Rendered:
    stored: str  # the prompt as recorded: its text, or its chat messages as JSON
    text: str  # what the tokenizer reads: the text, or the chat rendered by its template
    is_chat: bool
    prompt_id: str


def _render(record: dict[str, Any], where: str, tokenizer: PreTrainedTokenizerBase) -> _Rendered:
    """Validate one record and render it for the tokenizer."""
    text, messages = record.get("text"), record.get("messages")
    if (text is None) == (messages is None):
        raise PipelineError(
            f"{where}: needs exactly one of `text` (a string) or `messages` (a chat), "
            f"found keys {sorted(k for k, v in record.items() if v is not None)}."
        )
    if text is not None:
        if not isinstance(text, str) or not text:
            raise PipelineError(f"{where}: `text` must be a non-empty string.")
        return _Rendered(text, text, False, _prompt_id(record, where, text))
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
    stored = json.dumps(messages, ensure_ascii=False)
    return _Rendered(
        stored,
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
        True,
        _prompt_id(record, where, stored),
    )


def _prompt_id(record: dict[str, Any], where: str, source: str) -> str:
    raw_id = record.get("id")
    # bool is an int subclass: `id: true` is a mistake, not the id "True".
    if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int))):
        raise PipelineError(f"{where}: `id` must be a string or an integer (got {raw_id!r}).")
    if raw_id is None:
        return default_prompt_id(source)
    return str(raw_id)


def default_prompt_id(source: str) -> str:
    """Stable id of a prompt without one: ``sha256:`` and 16 hex digits of its source."""
    return "sha256:" + hashlib.sha256(source.encode()).hexdigest()[:16]


def _id_hash(prompt_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(prompt_id.encode(), digest_size=8).digest(), "big") - (
        1 << 63
    )


def _token_ids(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], add_special_tokens: bool
) -> Iterator[list[int]]:
    # The fast tokenizer's batch call fails on an empty batch.
    if not texts:
        return iter(())
    return iter(tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"])


def iter_prompts(
    path: Path, tokenizer: PreTrainedTokenizerBase, limit: int | None = None
) -> Iterator[Prompt]:
    """Read, validate and tokenize the prompt file at ``path``, one prompt at a time.

    Raises ``PipelineError`` for a missing, empty or unreadable file, a bad record (no
    ``text`` nor ``messages``, a bad ``id``) or two prompts with the same id (found
    when the file has been read to its end).
    """
    require_prompt_file(path)
    reader = _records_from_jsonl if path.suffix == ".jsonl" else _records_from_parquet
    records = islice(reader(path), limit)
    id_hashes = array("q")
    while batch := list(islice(records, _TOKENIZE_BATCH)):
        rendered = [_render(record, where, tokenizer) for where, record in batch]
        # Chat templates write the special tokens themselves; text gets the tokenizer's.
        plain = _token_ids(tokenizer, [r.text for r in rendered if not r.is_chat], True)
        chats = _token_ids(tokenizer, [r.text for r in rendered if r.is_chat], False)
        for prompt in rendered:
            id_hashes.append(_id_hash(prompt.prompt_id))
            token_ids = next(chats) if prompt.is_chat else next(plain)
            yield Prompt(prompt.prompt_id, prompt.stored, list(token_ids))
    if not id_hashes:
        raise PipelineError(f"prompt file {path} holds no prompts.")
    _refuse_duplicate_ids(path, np.frombuffer(id_hashes, dtype=np.int64), tokenizer, limit)


def _refuse_duplicate_ids(
    path: Path, id_hashes: np.ndarray, tokenizer: PreTrainedTokenizerBase, limit: int | None
) -> None:
    # In place: a sorted copy would double the 8 bytes per prompt the driver holds.
    id_hashes.sort()
    if not (id_hashes[1:] == id_hashes[:-1]).any():
        return
    # Rare path: read the file once more to name the two records (8-byte hashes of
    # distinct ids can collide, so compare the ids themselves).
    seen: dict[str, int] = {}
    reader = _records_from_jsonl if path.suffix == ".jsonl" else _records_from_parquet
    for index, (where, record) in enumerate(islice(reader(path), limit)):
        prompt_id = _render(record, where, tokenizer).prompt_id
        if prompt_id in seen:
            raise PipelineError(
                f"{where}: prompt id {prompt_id!r} already used by record "
                f"{seen[prompt_id] + 1}; ids must be unique."
            )
        seen[prompt_id] = index


def load_prompts(
    path: Path, tokenizer: PreTrainedTokenizerBase, limit: int | None = None
) -> list[Prompt]:
    """Every prompt of the file at ``path`` as a list (small files; see ``iter_prompts``)."""
    return list(iter_prompts(path, tokenizer, limit))


def prompt_room(max_tokens: int, max_model_len: int) -> int:
    """Most prompt tokens that leave room for a full completion and its scoring.

    Teacher forcing feeds prompt + completion and asks for one more token, so a prompt
    needs ``len(prompt) + max_tokens + 1 <= max_model_len``.
    """
    return max_model_len - max_tokens - 1


@dataclass(frozen=True)
class PromptShards:
    """What the prompts stage wrote: the number of prompts per shard, the longest prompt."""

    sizes: list[int]
    longest_prompt_tokens: int


def prompts_table(prompts: list[Prompt], run_seed: int) -> pa.Table:
    """The prompts with their token ids and sampling seeds (PROMPTS_SCHEMA)."""
    return pa.Table.from_pylist(
        [
            {
                "prompt_id": p.prompt_id,
                "source": p.source,
                "prompt_token_ids": p.token_ids,
                "sampling_seed": sampling_seed(run_seed, p.prompt_id),
            }
            for p in prompts
        ],
        schema=PROMPTS_SCHEMA,
    )


def write_prompt_shards(
    prompts: Iterable[Prompt],
    folder: Path,
    prompts_per_shard: int,
    run_seed: int,
    max_tokens: int,
    max_model_len: int,
    metadata: Callable[[int], dict[str, str]],
) -> PromptShards:
    """Write ``prompts`` as ``folder/part-N`` files of ``prompts_per_shard`` rows each.

    Holds one shard in memory at a time. A prompt that leaves no room for a completion
    of ``max_tokens`` and its scoring position in ``max_model_len`` (``prompt_room``) is
    refused by id. ``metadata(N)`` stamps part N.
    """
    room = prompt_room(max_tokens, max_model_len)
    sizes: list[int] = []
    longest = 0
    iterator = iter(prompts)
    while shard := list(islice(iterator, prompts_per_shard)):
        for prompt in shard:
            if len(prompt.token_ids) > room:
                raise PipelineError(
                    f"prompt {prompt.prompt_id!r} has {len(prompt.token_ids)} tokens, but "
                    f"with sampling.max_tokens={max_tokens} a prompt may have at most {room} "
                    f"tokens (context {max_model_len}; one position is kept for scoring). "
                    "Shorten it, lower sampling.max_tokens or raise engine.max_model_len."
                )
            longest = max(longest, len(prompt.token_ids))
        index = len(sizes)
        write_table(prompts_table(shard, run_seed), folder / part_name(index), metadata(index))
        sizes.append(len(shard))
    return PromptShards(sizes, longest)
