"""Candidate kinds: how each model of a run becomes the folder vLLM scores, and its identity.

The kinds are the members of ``pipeline.config.ModelConfig``:

- a model folder (``path``): scored as it is (a LoRA adapter folder given as ``path``
  is read as an adapter, as older configs wrote it);
- a LoRA adapter (``adapter``, ``base``): merged into its base with PEFT
  (``pipeline.lora``);
- an interpolation (``from``, ``to``, ``eta``): theta = theta0 + eta (theta1 - theta0)
  on every floating tensor (``interpolate_models``); a sweep in the config is a list of
  these, expanded when the config is read.

Each kind is materialised one way, into a folder, and described one way, by its
identity (what the manifest records): ``kind``, ``path`` (the folder scored),
``content_sha256`` (of that folder, which the score stage's fingerprint uses) and,
for a made model, ``inputs`` (the identities of what it was made from, and eta). A made
model is built once into ``merged_models_dir/<kind>-<key>`` through the atomic cache
of ``pipeline.cache``, where the key hashes the kind, ``RECIPE_VERSION`` and the content
hashes of its inputs: moving an input keeps the entry, changing one makes a new entry.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.cache import cached_folder
from pipeline.config import Interpolation, LoraAdapter, ModelConfig, ModelFolder, RunConfig
from pipeline.errors import PipelineError
from pipeline.identity import content_hash
from pipeline.lora import adapter_base, is_adapter, merge_adapter
from pipeline.models import (
    check_shared_tokenizer,
    load_tokenizer,
    require_model_dir,
)
from pipeline.terminal import LOGGER

if TYPE_CHECKING:
    import torch

# Bump when a kind makes different bytes from the same inputs, so old entries go unused.
RECIPE_VERSION = "1"
# Weight files of other formats, not copied into an interpolation (they would hold
# theta0's weights beside the interpolated safetensors).
_OTHER_WEIGHTS = {".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt"}


@dataclass(frozen=True)
class Candidate:
    """A model of the run, materialised: the folder vLLM loads and its identity."""

    path: Path
    identity: dict[str, Any]


def cache_key(kind: str, *parts: str) -> str:
    """``<kind>-<24 hex digits>``: SHA-256 of the kind, recipe version and ``parts``."""
    digest = hashlib.sha256("\0".join([kind, RECIPE_VERSION, *parts]).encode())
    return f"{kind}-{digest.hexdigest()[:24]}"


def _lerp(start: torch.Tensor, end: torch.Tensor, eta: float) -> torch.Tensor:
    import torch

    compute = torch.promote_types(start.dtype, torch.float32)
    # (1 - eta) theta0 + eta theta1 is theta0 + eta (theta1 - theta0), written so that
    # eta = 0 and eta = 1 give theta0 and theta1 bit for bit (the other form rounds).
    mixed = (1.0 - eta) * start.to(compute) + eta * end.to(compute)
    return mixed.to(start.dtype)


def _weight_files(name: str, folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PipelineError(
            f"model {name!r}: {folder} has no safetensors weights; interpolation reads "
            "only safetensors (save the model with save_pretrained(safe_serialization=True))."
        )
    return files


def _architecture(folder: Path) -> tuple[Any, Any]:
    config = json.loads((folder / "config.json").read_text())
    return config.get("model_type"), config.get("architectures")


def interpolate_models(name: str, start: Path, end: Path, eta: float, out: Path) -> None:
    """Write the model theta = theta0 + eta (theta1 - theta0) into the folder ``out``.

    Parameters
    ----------
    name
        The model's name, for errors.
    start, end
        Model folders of theta0 and theta1 with safetensors weights, one architecture,
        the same tensor names, shapes and dtypes, and one tokenizer.
    eta
        Step size (dimensionless): 0 gives theta0, 1 theta1, above 1 extrapolates.
    out
        Empty folder. It receives, per safetensors file of theta0 (same names, so an
        index file still applies), every floating tensor computed in float32 (float64
        tensors in float64) and stored in its own dtype, every other tensor as theta0's
        (it must equal theta1's), and theta0's other files (config, tokenizer, index),
        without weights of other formats.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    if _architecture(start) != _architecture(end):
        raise PipelineError(
            f"model {name!r}: cannot interpolate {start} and {end}: their architectures "
            f"differ ({_architecture(start)} vs {_architecture(end)})."
        )
    check_shared_tokenizer(
        {f"{name} (from)": load_tokenizer(name, start), f"{name} (to)": load_tokenizer(name, end)}
    )
    with ExitStack() as stack:
        opened = {
            folder: {
                f: stack.enter_context(safe_open(f, "pt")) for f in _weight_files(name, folder)
            }
            for folder in (start, end)
        }
        # A safetensors handle lists its tensors by keys() and is not iterable itself.
        names = {
            folder: {t: handle for handle in handles.values() for t in handle.keys()}  # noqa: SIM118
            for folder, handles in opened.items()
        }
        if set(names[start]) != set(names[end]):
            only = sorted(set(names[start]) ^ set(names[end]))
            raise PipelineError(
                f"model {name!r}: cannot interpolate {start} and {end}: {len(only)} "
                f"tensor names are in one only (e.g. {only[0]!r})."
            )
        for file, handle in opened[start].items():
            tensors = {}
            for tensor in handle.keys():  # noqa: SIM118
                theta0 = handle.get_tensor(tensor)
                theta1 = names[end][tensor].get_tensor(tensor)
                if theta0.shape != theta1.shape or theta0.dtype != theta1.dtype:
                    raise PipelineError(
                        f"model {name!r}: cannot interpolate tensor {tensor!r}: "
                        f"{tuple(theta0.shape)} {theta0.dtype} in {start}, "
                        f"{tuple(theta1.shape)} {theta1.dtype} in {end}."
                    )
                if theta0.is_floating_point():
                    tensors[tensor] = _lerp(theta0, theta1, eta)
                elif torch.equal(theta0, theta1):
                    tensors[tensor] = theta0
                else:
                    raise PipelineError(
                        f"model {name!r}: cannot interpolate the non-floating tensor "
                        f"{tensor!r}, which differs between {start} and {end}."
                    )
            save_file(tensors, out / file.name, metadata=handle.metadata())
    for item in start.iterdir():
        if item.is_file() and item.suffix not in {".safetensors", *_OTHER_WEIGHTS}:
            shutil.copy2(item, out / item.name)


class _Materialiser:
    """Makes the folders of a run's models, each once, hashing each folder once."""

    def __init__(self, models: dict[str, ModelConfig], cache_root: Path) -> None:
        self.models = models
        self.cache_root = cache_root
        self._made: dict[str, Candidate] = {}
        self._hashes: dict[Path, str] = {}

    def content_hash(self, folder: Path) -> str:
        folder = folder.resolve()
        if folder not in self._hashes:
            # Cached while no file of the folder changes: a resume does not rehash.
            self._hashes[folder] = content_hash(folder)
        return self._hashes[folder]

    def model(self, name: str) -> Candidate:
        if name not in self._made:
            self._made[name] = self._make(name, self.models[name])
        return self._made[name]

    def _make(self, name: str, spec: ModelConfig) -> Candidate:
        match spec:
            case ModelFolder(path=path, base=base) if is_adapter(path):
                return self.lora(name, path, base)
            case ModelFolder(path=path, base=None):
                return self.folder(name, path)
            case ModelFolder(path=path):
                raise PipelineError(
                    f"model {name!r}: `base` is only for a LoRA adapter, and {path} is a "
                    f"full model; remove models.{name}.base."
                )
            case LoraAdapter(adapter=adapter, base=base):
                return self.lora(name, adapter, base)
            case Interpolation():
                return self.interpolation(name, spec)
        raise TypeError(f"model {name!r}: {type(spec).__name__} is not materialised")

    def folder(self, name: str, path: Path) -> Candidate:
        require_model_dir(name, path)
        identity = {"kind": "path", "path": str(path), "content_sha256": self.content_hash(path)}
        return Candidate(path, identity)

    def reference(self, name: str, role: str, ref: str) -> Candidate:
        """The ``from`` or ``to`` model of an interpolation: a model of the run, or a folder."""
        if ref in self.models:
            made = self.model(ref)
            return Candidate(made.path, {"model": ref, **made.identity})
        return self.folder(f"{name} ({role})", Path(ref))

    def lora(self, name: str, adapter: Path, base: Path | None) -> Candidate:
        base = adapter_base(name, adapter, base)
        inputs = {
            "adapter": {"path": str(adapter), "content_sha256": self.content_hash(adapter)},
            "base": self.folder(f"{name} (base)", base).identity,
        }
        return self._made_model(
            name,
            "lora",
            inputs,
            f"merge of LoRA adapter {adapter} into {base}",
            lambda out: merge_adapter(name, adapter, base, out),
        )

    def interpolation(self, name: str, spec: Interpolation) -> Candidate:
        start = self.reference(name, "from", spec.start)
        end = self.reference(name, "to", spec.end)
        inputs = {"from": start.identity, "to": end.identity, "eta": spec.eta}
        return self._made_model(
            name,
            "interpolate",
            inputs,
            f"interpolation eta={spec.eta:g} from {spec.start} to {spec.end}",
            lambda out: interpolate_models(name, start.path, end.path, spec.eta, out),
        )

    def _made_model(
        self,
        name: str,
        kind: str,
        inputs: dict[str, Any],
        what: str,
        build: Callable[[Path], None],
    ) -> Candidate:
        """A model made by ``build``, cached under the content hashes of ``inputs``."""
        parts = [
            json.dumps(value["content_sha256"] if isinstance(value, dict) else value)
            for value in inputs.values()
        ]
        key = cache_key(kind, *parts)

        def announced(out: Path) -> None:
            LOGGER.info(f"  {name}: making the {what}")
            build(out)

        folder, made = cached_folder(self.cache_root, key, announced)
        if not made:
            LOGGER.info(f"  {name}: using the cached {what} ({folder})")
        identity = {
            "kind": kind,
            "path": str(folder),
            "content_sha256": self.content_hash(folder),
            "inputs": inputs,
        }
        return Candidate(folder, identity)


def materialise_models(config: RunConfig) -> dict[str, Candidate]:
    """Every model of ``config``, in config order, as a folder vLLM can load.

    LoRA merges and interpolations are made into ``config.merged_models_dir`` unless
    already there; a model that another one is made from is materialised once.
    """
    materialiser = _Materialiser(config.models, config.merged_models_dir.resolve())
    return {name: materialiser.model(name) for name in config.models}


def input_folders(models: dict[str, ModelConfig]) -> list[Path]:
    """The folders the models are read or made from (model folders, adapters, bases)."""
    folders: list[Path] = []
    for spec in models.values():
        match spec:
            case ModelFolder(path=path, base=base) | LoraAdapter(adapter=path, base=base):
                folders += [path] if base is None else [path, base]
            case Interpolation():
                folders += [Path(ref) for ref in (spec.start, spec.end) if ref not in models]
    return list(dict.fromkeys(folders))
