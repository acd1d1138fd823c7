"""Config loading: every shipped config validates; bad configs get precise errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from pipeline.candidates import input_folders
from pipeline.config import RunConfig, config_hash, load_config
from pipeline.errors import PipelineError
from tests.conftest import DEFAULT_CONFIG, ROOT


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    config = load_config(path)
    for folder in input_folders(config.models):
        assert (folder / "config.json").is_file()
    assert config.prompts.path.is_file()


def test_defaults_match_the_seeds() -> None:
    config = load_config(DEFAULT_CONFIG)
    assert config.entropy.unit == "sequence"
    assert config.entropy.include_eos is True
    assert config.uncertainty.estimand == "prompt_set"
    assert config.reference_model == "p0"
    assert config.candidates == ["p1"]
    assert config.engine.dtype == "float32"


def test_overrides_are_typed_and_change_the_hash() -> None:
    base = load_config(DEFAULT_CONFIG)
    changed = load_config(
        DEFAULT_CONFIG,
        ["entropy.unit=per_token", "entropy.include_eos=false", "sampling.num_samples=3"],
    )
    assert changed.entropy.unit == "per_token"
    assert changed.entropy.include_eos is False
    assert changed.sampling.num_samples == 3
    assert config_hash(changed) != config_hash(base)
    assert config_hash(load_config(DEFAULT_CONFIG)) == config_hash(base)


def test_relative_paths_are_taken_from_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(DEFAULT_CONFIG)
    assert config.prompts.path == ROOT / "data" / "prompts.jsonl"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("entropy.unit=bits", "entropy.unit: Input should be 'sequence' or 'per_token'"),
        ("sampling.num_samples=0", "sampling.num_samples: Input should be greater than 0"),
        ("sampling.max_tokens=many", "sampling.max_tokens: Input should be a valid integer"),
        ("entropy.colour=blue", "entropy.colour: unknown key"),
        ("reference_model=p9", "reference_model='p9' is not one of the models"),
        ("sampling.temperature=0", "sampling.temperature=0.0 is not supported"),
        ("sampling.top_k=5", "Set sampling.top_k to 0"),
        ("models.p1=null", "models.p1: Input should be a mapping of settings"),
        ("engine.dtype=int8", "engine.dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(PipelineError) as caught:
        load_config(DEFAULT_CONFIG, [override])
    assert message in str(caught.value)


def test_malformed_override_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"not of the form key\.sub=value"):
        load_config(DEFAULT_CONFIG, ["entropy.unit"])
    with pytest.raises(PipelineError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_config(bad)


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _leaf_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_readme_documents_every_config_key() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [
        key
        for key in _leaf_keys(RunConfig)
        if f"`{key}`" not in readme and f"`{key}.<name>.path`" not in readme
    ]
    assert not missing, f"config keys missing from the README's reference: {missing}"
