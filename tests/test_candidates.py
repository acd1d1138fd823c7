"""Candidate kinds: the config union, interpolated weights, the atomic content-keyed cache."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.cache import cached_folder, publish_folder
from pipeline.candidates import input_folders, interpolate_models, materialise_models
from pipeline.config import (
    Interpolation,
    LoraAdapter,
    ModelFolder,
    RunConfig,
    config_hash,
    load_config,
    validate_config,
)
from pipeline.errors import PipelineError
from tests.conftest import DEFAULT_CONFIG, ROOT, TINY_P0, TINY_P1

WEIGHTS = "model.safetensors"


def _write_config(folder: Path, models: str) -> Path:
    path = folder / "run.yaml"
    path.write_text(
        f"prompts:\n  path: {ROOT / 'data' / 'prompts.jsonl'}\nmodels:\n"
        + textwrap.indent(textwrap.dedent(models), "  ")
    )
    return path


def test_every_kind_parses_with_paths_from_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "adapters").mkdir()
    config = load_config(
        _write_config(
            tmp_path,
            """\
            p0: {path: models/p0}
            old-lora: {path: adapters/a, base: models/p0}
            lora: {adapter: adapters/a}
            half: {from: p0, to: models/p1, eta: 0.5}
            step: {from: p0, to: lora, etas: [0.25, 1, 2.0, -0.5, 1.0e-05]}
            """,
        )
    )
    assert config.models == {
        "p0": ModelFolder(path=tmp_path / "models/p0"),
        "old-lora": ModelFolder(path=tmp_path / "adapters/a", base=tmp_path / "models/p0"),
        "lora": LoraAdapter(adapter=tmp_path / "adapters/a"),
        # `from` and `to` name a model when they can, else a folder beside the config.
        "half": Interpolation.model_validate(
            {"from": "p0", "to": str(tmp_path / "models/p1"), "eta": 0.5}
        ),
        **{
            f"step@eta={text}": Interpolation.model_validate(
                {"from": "p0", "to": "lora", "eta": eta}
            )
            for text, eta in [
                ("0.25", 0.25),
                ("1", 1.0),
                ("2", 2.0),
                ("-0.5", -0.5),
                ("1e-05", 1e-5),
            ]
        },
    }
    assert config.candidates[:3] == ["old-lora", "lora", "half"]
    # The resolved config (as saved in the manifest) reads back as the same config.
    dumped = config.model_dump(mode="json")
    assert dumped["models"]["half"] == {"from": "p0", "to": str(tmp_path / "models/p1"), "eta": 0.5}
    again = validate_config(dumped, "the manifest")
    assert again == config
    assert config_hash(again) == config_hash(config)
    assert input_folders(config.models) == [
        tmp_path / "models/p0",
        tmp_path / "adapters/a",
        tmp_path / "models/p1",
    ]


def test_an_older_config_reads_as_before() -> None:
    config = load_config(DEFAULT_CONFIG)
    assert config.models == {"p0": ModelFolder(path=TINY_P0), "p1": ModelFolder(path=TINY_P1)}
    # Same resolved settings as before the kinds existed, so the same config hash.
    assert config.model_dump(mode="json")["models"]["p1"] == {"path": str(TINY_P1), "base": None}


@pytest.mark.parametrize(
    ("models", "message"),
    [
        (
            "p1: {colour: red}",
            "models.p1: say which model this is: `path: <model folder>`, `adapter: <LoRA "
            "adapter folder>`, `from`/`to`/`eta` (an interpolation) or `from`/`to`/`etas` "
            "(a sweep); got the keys ['colour']",
        ),
        ("p1: {path: a, adapter: b}", "models.p1: `path` and `adapter` belong to different kinds"),
        ("p1: {from: p0, to: b, eta: 1, etas: [1]}", "models.p1: give `eta` (one interpolation)"),
        ("p1: {from: p0, to: b}", "models.p1.eta: Field required"),
        ("p1: {from: p0, to: b, eta: .inf}", "models.p1.eta: Input should be a finite number"),
        ("p1: {from: p0, to: b, etas: []}", "models.p1.etas: List should have at least 1 item"),
        ("p1: {from: p0, etas: [1, x]}", "models.p1.etas.1: Input should be a valid number"),
        ("p1: {adapter: a, colour: red}", "models.p1.colour: unknown key"),
        ("p1: {from: p0, to: b, etas: [1, 1.0]}", "the sweep 'p1' lists a step size twice"),
        (
            "p1: {from: p0, to: b, etas: [1]}\nq: {from: p1, to: b, eta: 1}",
            "'q' has from: p1, a sweep, which is several models; name one of them (e.g. p1@eta=1)",
        ),
        (
            "p1: {from: p0, to: b, etas: [1]}\np1@eta=1: {path: c}",
            "model name 'p1@eta=1' is given twice",
        ),
        (
            "p1: {from: p0, to: q, eta: 1}\nq: {from: p1, to: p0, eta: 2}",
            "interpolations refer to each other in a cycle: p1 -> q -> p1",
        ),
    ],
)
def test_a_wrong_model_is_refused_at_its_key(tmp_path: Path, models: str, message: str) -> None:
    path = _write_config(tmp_path, f"p0: {{path: m}}\n{models}\n")
    with pytest.raises(PipelineError) as caught:
        load_config(path)
    assert message in str(caught.value)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS)


@pytest.fixture(scope="module")
def interpolated(tmp_path_factory: pytest.TempPathFactory) -> dict[float, Path]:
    """tiny-p0 -> tiny-p1 at a few step sizes, made directly (no cache)."""
    root = tmp_path_factory.mktemp("interpolated")
    folders = {}
    for eta in (0.0, 0.5, 1.0, 2.0):
        folders[eta] = root / f"eta={eta}"
        folders[eta].mkdir()
        interpolate_models("test", TINY_P0, TINY_P1, eta, folders[eta])
    return folders


def test_the_ends_of_an_interpolation_are_the_two_models_bit_for_bit(
    interpolated: dict[float, Path],
) -> None:
    theta0, theta1 = _weights(TINY_P0), _weights(TINY_P1)
    for eta, expected in ((0.0, theta0), (1.0, theta1)):
        made = _weights(interpolated[eta])
        assert made.keys() == expected.keys()
        for name, tensor in made.items():
            assert tensor.dtype == torch.float32
            assert torch.equal(tensor, expected[name]), (eta, name)
    # Between and beyond: theta0 + eta (theta1 - theta0), here computed in float64.
    for eta in (0.5, 2.0):
        for name, tensor in _weights(interpolated[eta]).items():
            exact = theta0[name].double() + eta * (theta1[name].double() - theta0[name].double())
            torch.testing.assert_close(tensor, exact.float(), rtol=2e-7, atol=1e-7)
    assert any(not torch.equal(_weights(interpolated[2.0])[name], theta1[name]) for name in theta1)
    # Everything else (config, tokenizer, chat template) is theta0's, byte for byte.
    others = sorted(p.name for p in TINY_P0.iterdir() if p.name != WEIGHTS)
    assert sorted(p.name for p in interpolated[0.5].iterdir()) == sorted([*others, WEIGHTS])
    for name in others:
        assert (interpolated[0.5] / name).read_bytes() == (TINY_P0 / name).read_bytes()


def _copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_interpolation_refuses_models_that_do_not_match(tmp_path: Path) -> None:
    other = _copy_model(TINY_P1, tmp_path / "other")
    weights = _weights(other)
    name = sorted(weights)[0]
    weights[name] = weights[name][:-1]  # one row fewer
    save_file(weights, other / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(PipelineError, match=f"cannot interpolate tensor '{name}'"):
        interpolate_models("m", TINY_P0, other, 0.5, tmp_path / "out")

    del weights[name]
    save_file(weights, other / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(PipelineError, match="1 tensor names are in one only"):
        interpolate_models("m", TINY_P0, other, 0.5, tmp_path / "out")

    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(PipelineError, match="their architectures differ"):
        interpolate_models("m", TINY_P0, other, 0.5, tmp_path / "out")

    binary = _copy_model(TINY_P1, tmp_path / "binary")
    (binary / WEIGHTS).rename(binary / "pytorch_model.bin")
    with pytest.raises(PipelineError, match="has no safetensors weights"):
        interpolate_models("m", TINY_P0, binary, 0.5, tmp_path / "out")


def _sweep_config(tmp_path: Path, end: Path, etas: str = "[0.5]") -> RunConfig:
    path = _write_config(
        tmp_path, f"p0: {{path: {TINY_P0}}}\ns: {{from: p0, to: {end}, etas: {etas}}}\n"
    )
    return load_config(path, [f"merged_models_dir={tmp_path / 'cache'}"])


def test_a_made_model_is_cached_by_the_content_of_its_inputs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="entropy_pipeline")
    first = _copy_model(TINY_P1, tmp_path / "first")
    made = materialise_models(_sweep_config(tmp_path, first))["s@eta=0.5"]
    assert "s@eta=0.5: making the interpolation eta=0.5 from p0 to" in caplog.text
    assert made.path.parent == tmp_path / "cache"
    assert made.identity == {
        "kind": "interpolate",
        "path": str(made.path),
        "content_sha256": made.identity["content_sha256"],
        "inputs": {
            "from": {
                "model": "p0",
                "kind": "path",
                "path": str(TINY_P0),
                "content_sha256": made.identity["inputs"]["from"]["content_sha256"],
            },
            "to": {
                "kind": "path",
                "path": str(first),
                "content_sha256": made.identity["inputs"]["to"]["content_sha256"],
            },
            "eta": 0.5,
        },
    }
    stamp = (made.path / WEIGHTS).stat().st_mtime_ns

    # The same content in another folder: the same entry, not made again.
    caplog.clear()
    moved = _copy_model(first, tmp_path / "moved")
    again = materialise_models(_sweep_config(tmp_path, moved))["s@eta=0.5"]
    assert again.path == made.path
    assert (again.path / WEIGHTS).stat().st_mtime_ns == stamp
    assert "using the cached interpolation" in caplog.text
    assert again.identity["content_sha256"] == made.identity["content_sha256"]

    # Other content (one weight changed), or another eta: a new entry.
    weights = _weights(moved)
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1.0
    save_file(weights, moved / WEIGHTS, metadata={"format": "pt"})
    changed = materialise_models(_sweep_config(tmp_path, moved))["s@eta=0.5"]
    other_eta = materialise_models(_sweep_config(tmp_path, first, "[0.25]"))["s@eta=0.25"]
    assert len({made.path, changed.path, other_eta.path}) == 3
    assert changed.identity["content_sha256"] != made.identity["content_sha256"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        p.name for p in (made.path, changed.path, other_eta.path)
    )


def test_a_base_beside_a_full_model_is_refused(tmp_path: Path) -> None:
    path = _write_config(
        tmp_path, f"p0: {{path: {TINY_P0}}}\np1: {{path: {TINY_P1}, base: {TINY_P0}}}\n"
    )
    with pytest.raises(PipelineError, match=r"`base` is only for a LoRA adapter.*models\.p1\.base"):
        materialise_models(load_config(path))


_KILLED_BUILDER = """
import sys, time
from pathlib import Path
from pipeline.cache import cached_folder

def build(out):
    (out / "half.bin").write_bytes(b"x" * 1000)
    Path(sys.argv[2]).touch()  # tell the test that the build is under way
    time.sleep(600)

cached_folder(Path(sys.argv[1]), "entry", build)
"""


def test_a_killed_build_leaves_no_entry_and_its_leftover_is_removed(tmp_path: Path) -> None:
    root, started = tmp_path / "cache", tmp_path / "started"
    builder = subprocess.Popen(
        [sys.executable, "-c", _KILLED_BUILDER, str(root), str(started)], cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert builder.poll() is None, "the builder ended before it was killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.kill(builder.pid, signal.SIGKILL)
        builder.wait()
    assert not (root / "entry").exists()
    (leftover,) = root.iterdir()
    assert leftover.name.startswith(".tmp-entry-")

    def build(out: Path) -> None:
        (out / "whole.bin").write_bytes(b"y")

    entry, made = cached_folder(root, "entry", build)
    assert made
    assert [p.name for p in root.iterdir()] == ["entry"]
    assert [p.name for p in entry.iterdir()] == ["whole.bin"]


def test_a_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def build(out: Path) -> None:
        (out / "part").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cached_folder(tmp_path, "entry", build)
    assert list(tmp_path.iterdir()) == []


def test_the_first_of_two_builders_wins(tmp_path: Path) -> None:
    target = tmp_path / "entry"

    def slow_build(out: Path) -> None:
        (out / "mine").write_text("slow")
        # Meanwhile another process publishes the same entry.
        assert publish_folder(target, lambda other: (other / "theirs").write_text("fast"))

    assert publish_folder(target, slow_build) is False
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]
    assert [p.name for p in target.iterdir()] == ["theirs"]
    # A rebuild replaces the folder whole.
    assert publish_folder(target, lambda out: (out / "new").write_text("new"), replace=True)
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]
    assert [p.name for p in target.iterdir()] == ["new"]
