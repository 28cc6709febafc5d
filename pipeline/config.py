"""Configuration: packaged defaults <- a YAML file <- command-line overrides.

Every stage reads its settings through `load_config`, so a value has one name everywhere
(`train.lr_aps` in YAML, in `dvc.yaml` params and in `dvc exp run -S`).

The merged config is checked against a pydantic schema (`Schema`: types and ranges), so that
`resolutions: abc`, `batch_size: 0` or `m_key: 1.5` stop at load time with the key named,
instead of failing deep inside a stage. Keys the schema does not list are not checked.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

DEFAULTS_PATH = Path(__file__).resolve().parent.parent / "configs" / "defaults.yaml"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and why."""


def deep_merge(base: dict, update: dict, where: str = "") -> dict:
    """Return `base` updated by `update`, recursing into dicts; unknown keys are an error."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        dotted = f"{where}{key}"
        if key not in merged:
            close = difflib.get_close_matches(str(key), [str(k) for k in merged], n=1, cutoff=0.5)
            hint = f"did you mean '{where}{close[0]}'? " if close else ""
            raise ConfigError(f"unknown config key '{dotted}' ({hint}see configs/defaults.yaml for the valid keys)")
        if isinstance(merged[key], dict) and isinstance(value, dict):
            merged[key] = deep_merge(merged[key], value, dotted + ".")
        elif isinstance(merged[key], dict):
            raise ConfigError(f"config key '{dotted}' is a section; give its fields, not a value")
        else:
            merged[key] = value
    return merged


# Limits on what a config file may be (a config is a few KB of plain settings): a "billion laughs"
# file of nested aliases, a 30 MB file or 100,000 nested brackets must stop at once with one line,
# not run for minutes, fill the memory or end in a RecursionError.
MAX_CONFIG_BYTES = 1 << 20   # 1 MiB (configs/defaults.yaml is about 12 KB)
MAX_CONFIG_DEPTH = 32        # nesting of mappings and lists (ours: 3)


class _RefusedYaml(yaml.YAMLError):
    """A YAML construct our configs never need (an alias, deep nesting); the message says which."""


class LimitedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses aliases (``*name``: the expansion of a "billion laughs" file)
    and nesting deeper than MAX_CONFIG_DEPTH, while composing, before anything is built."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise _RefusedYaml(f"YAML aliases (*name) are not allowed in a config (line {mark.line + 1}); "
                               "write the value out")
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                mark = self.peek_event().start_mark
                raise _RefusedYaml(f"nested deeper than {MAX_CONFIG_DEPTH} levels (line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def safe_yaml(text: str):
    """yaml.safe_load with `LimitedLoader`'s limits (no aliases, bounded nesting)."""
    loader = LimitedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict:
    """A config file as a dict; a missing, oversized, non-UTF-8, malformed or hostile file
    (aliases, deep nesting) is a `ConfigError` with one line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is {size / 2**20:.1f} MiB; a config is at most "
                          f"{MAX_CONFIG_BYTES >> 20} MiB of settings: refused")
    raw = path.read_bytes()[: MAX_CONFIG_BYTES + 1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                          f"{exc.start}); save it as UTF-8") from None
    try:
        data = safe_yaml(text) or {}
    except _RefusedYaml as exc:
        raise ConfigError(f"config file {path} refused: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def dotted_to_nested(overrides: dict[str, Any]) -> dict:
    """{'train.lr_aps': 1e-3} -> {'train': {'lr_aps': 1e-3}}; None values are dropped (flag not given)."""
    nested: dict = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


PositiveInt = Annotated[int, Field(ge=1)]
Rate = Annotated[float, Field(gt=0, le=10)]


class _Section(BaseModel):
    # Unknown keys are refused by deep_merge against defaults.yaml; keys other stages add are let through.
    model_config = ConfigDict(extra="allow", strict=False)


def _one_of(value, choices: tuple[str, ...]):
    """`value` if it is one of `choices`, else the error a Literal of them gives (validate_config's
    "did you mean" reads it): for choices read from a registry when the config is validated."""
    if isinstance(value, str) and value in choices:
        return value
    expected = " or ".join(filter(None, [", ".join(map(repr, choices[:-1])), repr(choices[-1])]))
    raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})


class DatasetSchema(_Section):
    # Layout names are those of the layout registry (pipeline/data/layouts.py, read at validation time).
    layout: str
    data: str
    labels: str | None = None
    scan_labels: str | None = None
    allow_modalities: list[Annotated[str, Field(min_length=1)]] = Field(default=["CT"], min_length=1)
    keep_ids: bool = False
    pseudonym_key: str | None = None
    max_pixels: Annotated[int, Field(ge=1)] = 4096 * 4096
    min_size: Annotated[int, Field(ge=1)] = 16

    @field_validator("layout", mode="before")
    @classmethod
    def _registered_layout(cls, layout):
        from pipeline.data import layouts

        return _one_of(layout, layouts.names())


class PhantomSchema(_Section):
    scans: PositiveInt
    seed: int
    layout: str  # a registered layout the phantom writes
    size: Annotated[int, Field(ge=16, le=4096)]

    @field_validator("layout", mode="before")
    @classmethod
    def _phantom_layout(cls, layout):
        from pipeline.data import layouts

        return _one_of(layout, layouts.phantom_names())


class ExtractSchema(_Section):
    out: str
    resolutions: list[Annotated[int, Field(ge=32, le=4096)]] = Field(min_length=1)
    windows: list[Annotated[list[float], Field(min_length=2, max_length=2)]] = Field(min_length=1)
    aps_source: Literal["upsampled", "native"]
    weights: str
    device: str
    batch_size: PositiveInt
    precision: Literal["auto", "fp32", "bf16"]
    scheduler: str | None = None
    workers: Annotated[int, Field(ge=0)]
    scans_per_commit: PositiveInt
    decode_chunk: PositiveInt = 16

    @field_validator("windows")
    @classmethod
    def _positive_widths(cls, windows):
        for center, width in windows:
            if width <= 0:
                raise ValueError(f"window [{center}, {width}]: the width must be positive")
        return windows


class SamplerSchema(_Section):
    m: PositiveInt
    augment: bool


class ModelSchema(_Section):
    # The one typed list of model settings (values and defaults: configs/defaults.yaml; the head
    # constructors' own defaults agree with it, tests/test_heads.py). Head names are those of the
    # head registry (pipeline/heads/registry.py, read at validation time: no second list here).
    name: Annotated[str, Field(min_length=1)]
    feature_dim: PositiveInt
    gru_hidden: PositiveInt
    fc_hidden: list[PositiveInt]
    dropout: Annotated[float, Field(ge=0, lt=1)]
    input_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.3
    scan_centre_quantile: Annotated[float, Field(ge=0, le=1)] = 0.2
    feature_attention: Literal["learnable", "softmax", "none"] = "learnable"
    feature_attention_scale: Literal["dim", "one"] = "dim"
    input_norm: Literal["scan", "standardize", "none"] = "scan"
    baseline_hidden: PositiveInt = 128
    m_key: PositiveInt
    aps_selection: Annotated[str, Field(min_length=1)]
    aps_resolution: Annotated[str, Field(min_length=1)]
    aps_fc: PositiveInt
    aps_gru_hidden: PositiveInt
    fusion_dim: PositiveInt

    @field_validator("name")
    @classmethod
    def _registered_head(cls, name):
        from pipeline.heads import registry

        heads = registry.names()
        if name.lower() not in heads:
            close = difflib.get_close_matches(name.lower(), heads, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown model '{name}'; choose from {', '.join(heads)}{hint}")
        return name


class TrainSchema(_Section):
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.01
    lr_primary: Rate
    lr_aps: Rate
    lr_fusion: Rate
    epochs: PositiveInt
    batch_size: PositiveInt
    folds: Annotated[int, Field(ge=2)]
    fold: Annotated[int, Field(ge=0)] | None = None
    seed: int
    device: str
    threads: PositiveInt | None = None
    eval_batch_size: PositiveInt
    out: str


class EvaluateSchema(_Section):
    threshold: Annotated[float, Field(ge=0, le=1)]


class ReportSchema(_Section):
    top_k: PositiveInt
    thumb_size: Annotated[int, Field(ge=16, le=4096)]
    display_size: Annotated[int, Field(ge=16, le=4096)]


class Schema(_Section):
    dataset: DatasetSchema
    phantom: PhantomSchema
    extract: ExtractSchema
    sampler: SamplerSchema
    model: ModelSchema
    train: TrainSchema
    evaluate: EvaluateSchema
    report: ReportSchema


def validate_config(config: dict) -> dict:
    """Check types and ranges of a merged config; `ConfigError` naming the first bad keys.

    Returns the config unchanged (values are checked, not rewritten, so DVC params stay as written)."""
    try:
        Schema.model_validate(config)
    except ValidationError as exc:
        problems = []
        for error in exc.errors()[:3]:
            key = ".".join(str(part) for part in error["loc"])
            hint = ""
            if error.get("type") == "literal_error" and isinstance(error.get("input"), str):
                expected = [str(v) for v in (error.get("ctx") or {}).get("expected", "").replace("'", "").replace(
                    " or ", ", ").split(", ") if v]
                close = difflib.get_close_matches(error["input"], expected, n=1, cutoff=0.5)
                hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"config key '{key}': {error['msg']} (got {error.get('input')!r}{hint})")
        raise ConfigError("; ".join(problems)) from None
    return config


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """Defaults, then the YAML file at `path` (if any), then dotted `overrides` (None = not given);
    validated by `validate_config`."""
    return _merged(read_yaml(path) if path is not None else {}, overrides)


def _merged(file_data: dict, overrides: dict[str, Any] | None) -> dict:
    config = deep_merge(read_yaml(DEFAULTS_PATH), file_data)
    if overrides:
        config = deep_merge(config, dotted_to_nested(overrides))
    return validate_config(config)


def sets_key(data: dict, dotted: str) -> bool:
    """Whether the nested mapping `data` (a config file's content) sets the dotted key itself."""
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


# Extraction settings a feature cache records. A run on a cache (`drct train`, `drct sweep`) takes
# them from the cache's provenance unless the config file or an override sets them: a head is
# trained on whatever vectors the cache holds. Ones the user sets stay, and the trainer checks them
# against the cache (pipeline.training.trainer.check_provenance: exit code 2 naming the field).
CACHE_SETTINGS = ("weights", "resolutions", "windows", "aps_source")


class RunConfig(NamedTuple):
    config: dict        # merged, validated, extraction settings filled from the cache
    cache_path: Any     # the cache given, else extract.out
    taken: list[str]    # "field=value" of each setting taken from the cache (for the log line)


def resolve_run_config(path: str | Path | None, overrides: dict[str, Any] | None = None,
                       cache_path: str | Path | None = None) -> RunConfig:
    """The config of a run on a feature cache, once: `load_config(path, overrides)` (the file read
    once), then each CACHE_SETTINGS field that neither the file nor `overrides` sets taken from the
    provenance of the cache at `cache_path` (default: extract.out). `ConfigError` for a bad config,
    `cache.store.CacheError` for a cache that cannot be opened."""
    from cache.store import FeatureCache

    file_data = read_yaml(path) if path is not None else {}
    config = _merged(file_data, overrides)
    cache_path = cache_path or config["extract"]["out"]
    with FeatureCache(cache_path) as cache:
        provenance = dict(cache.provenance)
    taken = []
    for field in CACHE_SETTINGS:
        key = f"extract.{field}"
        if key in (overrides or {}) or sets_key(file_data, key) or provenance.get(field) is None:
            continue
        if config["extract"].get(field) != provenance[field]:
            config["extract"][field] = provenance[field]
            taken.append(f"{field}={provenance[field]}")
    return RunConfig(config, cache_path, taken)
