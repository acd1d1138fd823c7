"""Bad input gets one clear error line and leaves no artifact that looks complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_CONFIG, TINY_P0, run_cli


def _fails_cleanly(capsys: pytest.CaptureFixture[str], run_dir: Path, *argv: str | Path) -> str:
    code = run_cli("run", "--config", DEFAULT_CONFIG, "--out", run_dir, *argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "entropy-pipeline: error:" in err
    assert "Traceback" not in err
    assert not run_dir.exists(), "bad input must be refused before the run directory is made"
    return err


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _fails_cleanly(capsys, tmp_path / "run", f"models.p1.path={tmp_path / 'nowhere'}")
    assert "model 'p1'" in err
    assert "does not exist" in err


def test_mismatched_tokenizers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other-tokenizer"
    shutil.copytree(TINY_P0, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    err = _fails_cleanly(capsys, tmp_path / "run", f"models.p1.path={other}")
    assert "do not share a tokenizer" in err
    assert "vocabulary" in err


@pytest.mark.parametrize(
    "override",
    [
        "sampling.temperature=0.7",
        "sampling.top_p=0.9",
        "sampling.top_k=50",
        "sampling.min_p=0.05",
        "sampling.repetition_penalty=1.1",
        "sampling.min_tokens=3",
    ],
)
def test_unsupported_sampling_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str
) -> None:
    err = _fails_cleanly(capsys, tmp_path / "run", override)
    key = override.split("=")[0]
    assert f"{key}=" in err
    assert "prompt_logprobs" in err


def test_empty_prompt_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = _write(tmp_path / "empty.jsonl", "\n\n")
    err = _fails_cleanly(capsys, tmp_path / "run", f"prompts.path={prompts}")
    assert "holds no prompts" in err


def test_malformed_prompt_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = _write(tmp_path / "bad.jsonl", '{"text": "One day,"}\n{"text": "Long ago\n')
    err = _fails_cleanly(capsys, tmp_path / "run", f"prompts.path={prompts}")
    assert "line 2" in err
    assert "not valid JSON" in err


def test_prompt_without_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = _write(tmp_path / "notext.jsonl", '{"id": "a", "prompt": "One day,"}\n')
    err = _fails_cleanly(capsys, tmp_path / "run", f"prompts.path={prompts}")
    assert "record 1" in err
    assert "`text`" in err


def test_prompt_longer_than_context(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    long_text = "One day, Mia went to the park. " * 40
    prompts = _write(
        tmp_path / "long.jsonl",
        json.dumps({"id": "short", "text": "One day,"})
        + "\n"
        + json.dumps({"id": "too-long", "text": long_text})
        + "\n",
    )
    err = _fails_cleanly(capsys, tmp_path / "run", f"prompts.path={prompts}")
    assert "'too-long'" in err
    assert "sampling.max_tokens=48" in err


def test_unknown_config_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _fails_cleanly(capsys, tmp_path / "run", "sampling.temprature=1.0")
    assert "sampling.temprature: unknown key" in err


def test_existing_run_directory_is_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("mine")
    code = run_cli("run", "--config", DEFAULT_CONFIG, "--out", run_dir)
    assert code == 2
    assert "not a run directory" in capsys.readouterr().err
    assert (run_dir / "keep.txt").read_text() == "mine"


def test_crash_mid_run_leaves_no_summary_and_stats_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A candidate whose weights are corrupt fails after sampling: the run stays incomplete,
    loses nothing, and resumes once the model is repaired."""
    broken = tmp_path / "broken-p1"
    shutil.copytree(TINY_P0, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    run_dir = tmp_path / "run"
    args = (
        "run",
        "--config",
        DEFAULT_CONFIG,
        "--out",
        run_dir,
        f"models.p1.path={broken}",
        "prompts.limit=3",
        "sampling.num_samples=2",
    )
    assert run_cli(*args) == 2
    assert "model 'p1': vLLM could not load" in capsys.readouterr().err
    assert (run_dir / "samples" / "part-00000.parquet").exists()
    assert not (run_dir / "summary.json").exists()
    assert not list(run_dir.rglob(".*.tmp-*"))
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "running"
    assert run_cli("stats", run_dir) == 2
    assert "did not finish" in capsys.readouterr().err
    # Resuming with the model repaired redoes only p1's scores and completes the run.
    shutil.copy(TINY_P0 / "model.safetensors", broken / "model.safetensors")
    samples_before = (run_dir / "samples" / "part-00000.parquet").stat().st_mtime_ns
    assert run_cli(*args) == 0
    assert (run_dir / "samples" / "part-00000.parquet").stat().st_mtime_ns == samples_before
    assert json.loads((run_dir / "summary.json").read_text())["delta_H_nats"] == 0.0


def test_stats_refuses_non_entropy_override(
    demo_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("stats", demo_run, "sampling.num_samples=4") == 2
    assert "can change only entropy.*, weights.*, uncertainty.*" in capsys.readouterr().err


def test_stats_on_a_folder_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("stats", tmp_path) == 2
    assert "not a run directory" in capsys.readouterr().err
