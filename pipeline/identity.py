"""The model scored is the model recorded: model content hashes, cached, and re-checked.

A model's identity in the manifest is the SHA-256 of its folder
(``models.model_content_hash``). Hashing 100 GB of weights takes minutes, so the hash
is cached in ``<cache dir>/entropy-pipeline/hashes.json`` (the cache dir is
``$XDG_CACHE_HOME``, else ``~/.cache``), keyed by the folder's resolved path and valid
only while every file in it has the same *signature*: relative name, size,
modification time, status-change time and inode. Rewriting a file changes its
modification and status-change times; ``cp -p``, ``touch -d`` or ``rsync -t`` can put
an old modification time back but not the status-change time, which only the kernel
sets; replacing a file by a rename changes the inode. So a cached hash is used only
for a folder whose files were not touched since it was hashed, and a resume does not
rehash unchanged weights.

``check_model_unchanged`` is called by the driver right before a model's engine
loads: a model whose content differs from what the run recorded stops the run.

The cache is only a shortcut: it is written atomically (a reader sees the old or the
new file), an unreadable cache counts as empty, and entries of folders that no longer
exist are dropped when it is written.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pipeline.artifacts import write_json
from pipeline.errors import PipelineError
from pipeline.models import model_content_hash, require_model_dir

HASH_CACHE = "hashes.json"


def cache_file() -> Path:
    """``$XDG_CACHE_HOME/entropy-pipeline/hashes.json`` (default ``~/.cache/...``)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "entropy-pipeline" / HASH_CACHE


def folder_signature(path: Path) -> list[list[Any]]:
    """[relative name, size, mtime_ns, ctime_ns, inode] of every file under ``path``, sorted.

    Symbolic links are followed (a Hugging Face cache folder links to its blobs).
    """
    signature = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        status = file.stat()
        signature.append(
            [
                str(file.relative_to(path)),
                status.st_size,
                status.st_mtime_ns,
                status.st_ctime_ns,
                status.st_ino,
            ]
        )
    return signature


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        cache = json.loads(path.read_bytes())
    except (OSError, ValueError):  # missing, unreadable or damaged: rebuilt as it is used
        return {}
    return cache if isinstance(cache, dict) else {}


def content_hash(path: Path) -> str:
    """``model_content_hash(path)``, from the cache while the folder's signature holds.

    A folder that changes while it is hashed is hashed again rather than cached.
    """
    key = str(path.resolve())
    signature = folder_signature(path)
    cache_path = cache_file()
    entry = _read_cache(cache_path).get(key)
    if isinstance(entry, dict) and entry.get("files") == signature:
        return str(entry["sha256"])
    digest = model_content_hash(path)
    if folder_signature(path) != signature:
        return content_hash(path)
    cache = {k: v for k, v in _read_cache(cache_path).items() if Path(k).is_dir()}
    cache[key] = {"sha256": digest, "files": signature}
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, cache_path)
    except OSError as err:  # only costs a rehash next time: say so, and go on
        logging.getLogger("entropy_pipeline").warning(
            "cannot write the model hash cache %s (%s); models will be hashed again",
            cache_path,
            err.strerror or err,
        )
    return digest


def check_model_unchanged(name: str, path: Path, recorded_sha256: str) -> None:
    """Refuse model ``name`` when its folder's content is no longer ``recorded_sha256``.

    Raises
    ------
    PipelineError
        When the folder is gone, or its content hash differs from the recorded one.
    """
    require_model_dir(name, path)
    current = content_hash(path)
    if current != recorded_sha256:
        raise PipelineError(
            f"model {name!r} changed after the run recorded it: {path} now has content "
            f"sha256 {current[:16]}..., the run recorded {recorded_sha256[:16]}... "
            "Put the recorded model back and resume, or run again (with --force to redo "
            "what the old model made, or with a new --out)."
        )
