"""Bad input gets one clear error line and leaves no artifact that looks complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_CONFIG, TINY_P0, TINY_P1, run_cli


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


def _refused(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> str:
    """Run the CLI, require exit status 2 and one error line; return that line."""
    assert run_cli(*argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("entropy-pipeline: error: ")
    return lines[0]


def _config(tmp_path: Path, extra: str) -> Path:
    """A config file naming the shipped prompts and tiny models by absolute paths."""
    return _write(
        tmp_path / "config.yaml",
        f"seed: 0\nprompts:\n  path: {DEFAULT_CONFIG.parent.parent / 'data' / 'prompts.jsonl'}\n"
        f"models:\n  p0: {{path: {TINY_P0}}}\n  p1: {{path: {TINY_P1}}}\n{extra}",
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("seed: 1\n", "line 7, column 1: key 'seed' is given twice (first on line 1); keep one"),
        (
            "sampling:\n  num_samples: 8\n  max_tokens: 4\n  num_samples: 16\n",
            "line 10, column 3: key 'num_samples' is given twice (first on line 8); keep one",
        ),
    ],
)
def test_a_yaml_key_given_twice_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, message: str
) -> None:
    config = _config(tmp_path, extra)
    line = _refused(capsys, "run", "--config", config, "--out", tmp_path / "run")
    assert line == f"entropy-pipeline: error: config file {config} is not valid YAML: {message}."
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "sampling.num_samples=true",
            "sampling.num_samples: Input should be a valid integer (got True)",
        ),
        (
            "sampling.max_tokens=8.0",
            "sampling.max_tokens: Input should be a valid integer (got 8.0)",
        ),
        ("seed=false", "seed: Input should be a valid integer (got False)"),
        ("prompts.limit=true", "prompts.limit: Input should be a valid integer (got True)"),
        ("entropy.include_eos=1", "entropy.include_eos: Input should be a valid boolean (got 1)"),
        (
            "sampling.stop_token_ids=[true]",
            "sampling.stop_token_ids.0: Input should be a valid integer (got True)",
        ),
    ],
)
def test_a_bool_is_not_a_number_nor_a_number_a_bool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, message: str
) -> None:
    err = _fails_cleanly(capsys, tmp_path / "run", override)
    assert err == f"entropy-pipeline: error: invalid config {DEFAULT_CONFIG}: {message}\n"


def test_other_config_file_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"seed: 0\n# caf\xe9\n")
    line = _refused(capsys, "run", "--config", latin1, "--out", tmp_path / "run")
    assert line.endswith(
        f"config file {latin1} is not UTF-8 text (byte 13 is b'\\xe9'); save it as UTF-8."
    )
    line = _refused(capsys, "run", "--config", f"{tmp_path}/", "--out", tmp_path / "run")
    assert line.endswith(f"config file {tmp_path} is a folder; pass a YAML file.")
    line = _refused(capsys, "run", "--out", tmp_path / "run", "sampling.stop_token_ids=[1,")
    assert "override 'sampling.stop_token_ids=[1,': the value is not valid YAML (line 1" in line
    assert not (tmp_path / "run").exists()


def test_a_prompt_id_that_is_a_bool_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = _write(
        tmp_path / "ids.jsonl",
        '{"id": "a", "text": "One day,"}\n{"id": true, "text": "Long ago"}\n',
    )
    err = _fails_cleanly(capsys, tmp_path / "run", f"prompts.path={prompts}")
    assert "record 2" in err
    assert "`id` must be a string or an integer (got True)" in err


def test_out_naming_a_regular_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _write(tmp_path / "notes.txt", "mine")
    line = _refused(capsys, "run", "--out", out)
    assert line == (
        f"entropy-pipeline: error: --out {out} is a file; --out names a run directory (a new "
        "folder, or a run to resume)."
    )
    assert out.read_text() == "mine"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"schema_version": 1, "status": "compl', "not valid JSON (Unterminated string"),
        (b"\xff\xfe{}", "not valid JSON ("),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_a_damaged_manifest_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | bytes, problem: str
) -> None:
    manifest = tmp_path / "manifest.json"
    if isinstance(content, bytes):
        manifest.write_bytes(content)
    else:
        manifest.write_text(content)
    line = _refused(capsys, "stats", tmp_path)
    assert line.startswith(f"entropy-pipeline: error: {manifest} is damaged: {problem}")
    assert line.endswith(
        "It is written atomically, so something else changed it; restore it from a backup "
        "or start a new run directory."
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "sampling.stop_token_ids=[999999]",
            "sampling.stop_token_ids: 999999 is not a token id of model 'p0', whose "
            "vocabulary has ids 0 ... 511.",
        ),
        ("seed=4294967296", "seed=4294967296 is above 4294967295: vLLM seeds its engines"),
        (
            "engine.max_model_len=100000",
            "engine.max_model_len=100000 is above the context of model 'p0' (256 tokens",
        ),
        # Derived from the prompts (longest + max_tokens + 1): found with the prompts.
        (
            "engine.kv_cache_memory_bytes=500000",
            "engine.kv_cache_memory_bytes=500000 cannot hold one sequence of ",
        ),
        (
            "engine.kv_cache_memory_bytes=786431 engine.max_model_len=256",
            "engine.kv_cache_memory_bytes=786431 cannot hold one sequence of 256 tokens "
            "(engine.max_model_len) of model 'p0': vLLM needs 786432 bytes on cpu",
        ),
    ],
)
def test_settings_vllm_would_refuse_late_are_refused_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, message: str
) -> None:
    err = _fails_cleanly(capsys, tmp_path / "run", *override.split())
    assert err.splitlines()[-1].startswith(f"entropy-pipeline: error: {message}")


def test_a_non_finite_log_prob_from_vllm_is_refused_where_it_enters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A candidate with a NaN weight scores NaN: refused naming model, prompt and sample."""
    from safetensors.numpy import load_file, save_file

    broken = tmp_path / "nan-p1"
    shutil.copytree(TINY_P1, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.norm.weight"][:] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    run_dir = tmp_path / "run"
    args = ["prompts.limit=2", "sampling.num_samples=2", f"models.p1.path={broken}"]
    assert run_cli("run", "--config", DEFAULT_CONFIG, "--out", run_dir, *args) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "entropy-pipeline: error: model 'p1' (score/p1, shard 0): vLLM's output is holding a "
        "non-finite token log-prob (nan; prompt 'story-000', sample_idx 0, token 0); nothing "
        "was written. A NaN or infinite log-prob means the model gives a sampled token "
        "probability 0 or computes NaN: check its weights and engine.dtype."
    )
    assert not list(run_dir.glob("scores/p1/*"))
    assert not (run_dir / "summary.json").exists()
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "running"
