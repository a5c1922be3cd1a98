"""Training configuration: typed dataclasses, loaded from YAML with strict validation.

An unknown key, a value of the wrong type or out of its range is an error naming its dotted
path, found when the file is read, not hours into a run. ``--set a.b=value`` overrides and the
configs stored in checkpoints go through the same checks.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cossim_fast.data.labels import PROTOCOLS
from cossim_fast.models.deeplabv2 import MODEL_NAMES


class ConfigError(ValueError):
    """A configuration file or override that does not match the schema."""


@dataclass
class DomainConfig:
    kind: str = "gta5"  # gta5 | synthia | cityscapes
    root: str = "data/synthetic/gta5"
    split: str = "train"  # cityscapes only
    size: list[int] = field(default_factory=lambda: [128, 64])  # (width, height) after resize


@dataclass
class SyntheticConfig:
    """The embedded default data: generated into ``root`` before training when enabled (the
    shipped ``synthetic`` config turns it on; a config of one's own data need not mention it)."""

    enabled: bool = False
    root: str = "data/synthetic"
    seed: int = 0
    num_source: int = 1000
    num_source_val: int = 200  # held-out source images (root/gta5_val), for the source mIoU
    num_target_train: int = 1000
    num_target_val: int = 200
    size: list[int] = field(default_factory=lambda: [128, 64])
    style_strength: float = 0.3

    def generate(self) -> dict[str, Path]:
        """Write the data this section describes under ``root`` (nothing if it is there already);
        the paths of :func:`cossim_fast.data.generate_synthetic_uda`."""
        from cossim_fast import data  # looked up at call time: tests stand in for the generator

        return data.generate_synthetic_uda(
            self.root, seed=self.seed, num_source=self.num_source, num_source_val=self.num_source_val,
            num_target_train=self.num_target_train, num_target_val=self.num_target_val, size=tuple(self.size),
            style_strength=self.style_strength,
        )


@dataclass
class DataConfig:
    source: DomainConfig = field(default_factory=DomainConfig)
    target: DomainConfig = field(default_factory=lambda: DomainConfig(kind="cityscapes", root="data/synthetic/cityscapes"))
    val: DomainConfig = field(
        default_factory=lambda: DomainConfig(kind="cityscapes", root="data/synthetic/cityscapes", split="val")
    )
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    num_workers: int = 0
    deep_scan: bool = False  # decode every file before training (catches truncated downloads; slow on full sets)
    flip: bool = True
    protocols: list[int] = field(default_factory=lambda: [19])


@dataclass
class ModelConfig:
    name: str = "deeplabv2_small"
    pretrained: str | None = None  # a local torchvision-format ResNet state dict
    feature_point: str = "backbone"  # backbone | pre_activation
    freeze_bn: bool | None = None  # None: frozen exactly when pretrained weights are given
    init_from: str | None = None  # start from this checkpoint's weights (e.g. a source-only run)
    activation_checkpointing: bool = False  # recompute backbone blocks in the backward: less memory, more time


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 2.5e-4
    head_lr_mult: float = 10.0
    momentum: float = 0.9  # sgd only
    weight_decay: float = 5e-4
    poly_power: float = 0.9


@dataclass
class CosineConfig:
    """The cosine-similarity loss (METHOD.md 4-6); the levers that decide whether it helps."""

    enabled: bool = True
    weight: float = 0.1  # lambda_cos
    threshold: float = 0.9  # tau, strict >
    mode: str = "max"  # max | all
    reduction: str = "class_mean"  # mean | class_mean
    slots_per_class: int = 1024  # M
    max_per_class: int | None = 64  # rows written per class per update
    pseudo_threshold: float = 0.8  # keep target pseudo-labels above this softmax confidence
    class_cap: float | None = 0.3  # at most this share of kept target rows per class
    warmup_iters: int = 0  # loss off before this iteration
    ramp_iters: int = 0  # then its weight rises linearly over this many iterations
    backend: str = "auto"


@dataclass
class EntropyConfig:
    """Entropy minimization on the target (ADVENT's MinEnt), an optional base UDA loss."""

    weight: float = 0.0


@dataclass
class TrainConfig:
    iterations: int = 600
    batch_size_source: int = 4
    batch_size_target: int = 4
    grad_accum: int = 1
    ce_bands: int = 1  # source cross-entropy at full resolution in this many bands of rows (memory)
    amp: str = "none"  # none | bf16 | fp16 (autocast on the run's device; fp16 adds loss scaling)
    log_every: int = 20
    eval_every: int = 200
    checkpoint_every: int = 200
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch.set_num_threads on CPU
    # The operator's NaN/label/count checks read the data (a host sync on GPU): run them on
    # the first iteration and then every this many.
    check_values_every: int = 100


@dataclass
class Config:
    seed: int = 0
    output_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    cosine: CosineConfig = field(default_factory=CosineConfig)
    entropy: EntropyConfig = field(default_factory=EntropyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


CHOICES = {
    "model.name": MODEL_NAMES,
    "data.source.kind": ("gta5", "synthia", "cityscapes"),
    "data.target.kind": ("gta5", "synthia", "cityscapes"),
    "data.val.kind": ("gta5", "synthia", "cityscapes"),
    "model.feature_point": ("backbone", "pre_activation"),
    "optim.name": ("sgd", "adamw"),
    "cosine.mode": ("max", "all"),
    "cosine.reduction": ("mean", "class_mean"),
    "cosine.backend": ("auto", "reference", "torch", "triton", "cuda"),
    "train.amp": ("none", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
}


def _at_least(low: float) -> tuple[typing.Callable[[Any], bool], str]:
    return (lambda v: math.isfinite(v) and v >= low), f">= {low}"


def _above(low: float) -> tuple[typing.Callable[[Any], bool], str]:
    return (lambda v: math.isfinite(v) and v > low), f"> {low}"


def _within(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> tuple[typing.Callable[[Any], bool], str]:
    def check(v: Any) -> bool:
        return (v > low if open_low else v >= low) and (v < high if open_high else v <= high)

    return check, f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"


_POSITIVE = _at_least(1)
_IMAGE_SIZE = (lambda v: len(v) == 2 and min(v) >= 1), "[width, height], both >= 1"
_SYNTHETIC_SIZE = (lambda v: len(v) == 2 and min(v) >= 16), "[width, height], both >= 16 (the generator's scenes)"

#: Ranges beyond the type, checked where the value is read (None, where allowed, passes).
RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    # Seeds are mixed into others (seed * 1_000_003 + epoch, ...) that torch takes as 64-bit.
    "seed": _within(0, 2**32 - 1),
    "data.synthetic.seed": _within(0, 2**32 - 1),
    **{f"train.{name}": _POSITIVE for name in (
        "iterations", "batch_size_source", "batch_size_target", "grad_accum", "ce_bands", "log_every", "eval_every",
        "checkpoint_every", "threads", "check_values_every",
    )},
    **{f"data.{domain}.size": _IMAGE_SIZE for domain in ("source", "target", "val")},
    "data.synthetic.size": _SYNTHETIC_SIZE,
    **{f"data.synthetic.{name}": _POSITIVE for name in ("num_source", "num_source_val", "num_target_train", "num_target_val")},
    "data.synthetic.style_strength": _within(0, 1),
    "data.num_workers": _at_least(0),
    "data.protocols": (
        lambda v: len(v) >= 1 and len(set(v)) == len(v) and set(v) <= set(PROTOCOLS),
        f"a non-empty list of distinct class counts from {sorted(PROTOCOLS, reverse=True)}",
    ),
    "optim.lr": _above(0),
    "optim.head_lr_mult": _above(0),
    "optim.momentum": _within(0, 1, open_high=True),
    "optim.weight_decay": _at_least(0),
    "optim.poly_power": _at_least(0),
    "cosine.weight": _at_least(0),
    "cosine.threshold": _within(-1, 1),
    "cosine.slots_per_class": _POSITIVE,
    "cosine.max_per_class": _POSITIVE,
    "cosine.pseudo_threshold": _within(0, 1, open_high=True),
    "cosine.class_cap": _within(0, 1, open_low=True),
    "cosine.warmup_iters": _at_least(0),
    "cosine.ramp_iters": _at_least(0),
    "entropy.weight": _at_least(0),
}


def _check_value(path: str, annotation: Any, value: Any, default: Any = None) -> Any:
    """``value`` converted to ``annotation``, or a ConfigError naming ``path``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        (annotation,) = [option for option in options if option is not type(None)]
        try:
            return _check_value(path, annotation, value, default)
        except ConfigError as error:
            raise ConfigError(f"{error} (or null: {_NULL_MEANS.get(path, 'unset')})") from None
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, path, default)
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list of {item.__name__}, got {value!r}")
        return _check_range(path, [_check_value(f"{path}[{i}]", item, v) for i, v in enumerate(value)])
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass  # reported below as the wrong type
    if annotation is bool and not isinstance(value, bool) or not isinstance(value, annotation) or (
        annotation is int and isinstance(value, bool)
    ):
        raise ConfigError(f"{path}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    if path in CHOICES and value not in CHOICES[path]:
        raise ConfigError(f"{path}: expected one of {CHOICES[path]}, got {value!r}")
    return _check_range(path, value)


#: What null means for the optional keys, said when a value for one is refused.
_NULL_MEANS = {
    "model.pretrained": "random initialization",
    "model.freeze_bn": "frozen exactly when pretrained weights are given",
    "model.init_from": "no starting checkpoint",
    "cosine.max_per_class": "no per-class limit",
    "cosine.class_cap": "no cap",
    "train.threads": "torch's default",
}


def _check_range(path: str, value: Any) -> Any:
    if path in RULES:
        check, expected = RULES[path]
        if not check(value):
            raise ConfigError(f"{path}: expected {expected}, got {value!r}")
    return value


def _build(cls: type, values: Any, path: str = "", defaults: Any = None) -> Any:
    """``cls`` from ``values``; missing keys keep ``defaults`` (the parent's default for a
    nested section, which may differ from the section class's own defaults)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown key {path + '.' if path else ''}{key} (known: {', '.join(sorted(names))})")
    defaults = defaults if defaults is not None else cls()
    kwargs = {}
    for name in names:
        dotted = f"{path}.{name}" if path else name
        if name in values:
            kwargs[name] = _check_value(dotted, hints[name], values[name], getattr(defaults, name))
        else:
            kwargs[name] = getattr(defaults, name)
    return cls(**kwargs)


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _annotation(parts: list[str]) -> Any:
    """The type of the key ``parts`` names in :class:`Config` (None for an unknown key)."""
    annotation: Any = Config
    for part in parts:
        if not dataclasses.is_dataclass(annotation):
            return None
        annotation = typing.get_type_hints(annotation).get(part)
    return annotation


def _parse_value(key: str, raw: str) -> Any:
    """The text of ``key=raw`` as YAML, except for string keys: a path or name is taken as
    written (YAML would read ``123`` as a number, a date as a date, and cut ``a #b`` at ``#``)."""
    annotation = _annotation(key.split("."))
    text = raw.strip()
    quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
    if annotation in (str, str | None) and not quoted and not (annotation != str and text in ("null", "~", "")):
        return text
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {key}={raw}: the value is not valid YAML ({_first_line(error)})") from None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]


def parse_override(text: str) -> dict:
    """``"cosine.weight=0.05"`` -> ``{"cosine": {"weight": 0.05}}`` (the value parsed as YAML,
    or taken as written for a string key)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    nested: dict = {}
    cursor = nested
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = _parse_value(key, raw)
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """The defaults (or ``base``, e.g. a checkpoint's config), then the YAML file at ``path``,
    then ``key=value`` overrides, all checked."""
    values: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', None) or _first_line(error)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        values = _merge(values, loaded)
    for text in overrides or []:
        values = _merge(values, parse_override(text))
    return _build(Config, values)


def config_from_dict(values: dict) -> Config:
    """A checked :class:`Config` from a plain mapping (e.g. the one a checkpoint stores)."""
    return _build(Config, values)


#: Keys that change how a run reports, or how fast and lean it runs, not what it computes (or
#: only in the last bits), so switching them on resume (e.g. the memory levers after running
#: out of memory) is not reported as a change of the experiment.
NON_RESULT_KEYS = frozenset({
    "output_dir", "train.log_every", "train.eval_every", "train.checkpoint_every", "train.check_values_every",
    "train.threads", "data.num_workers", "data.deep_scan", "model.activation_checkpointing", "cosine.backend", "train.ce_bands",
})


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(old: dict, new: dict) -> list[str]:
    """``"key: old -> new"`` for every setting that differs (``NON_RESULT_KEYS`` aside)."""
    before, after = _flatten(old), _flatten(new)
    return [
        f"{key}: {before.get(key, '(absent)')!r} -> {after.get(key, '(absent)')!r}"
        for key in sorted(before.keys() | after.keys())
        if key not in NON_RESULT_KEYS and before.get(key) != after.get(key)
    ]


#: Settings a checkpoint's state is shaped by (the model's parameters, the dictionary's slots
#: and what its features are, the optimizer's kind of state): a resume cannot change them.
STATE_KEYS = ("model.name", "model.feature_point", "cosine.slots_per_class", "optim.name")


def _frozen_bn(flat: dict[str, Any]) -> bool:
    """Whether BatchNorm is frozen (its parameters then are not in the optimizer's groups)."""
    chosen = flat.get("model.freeze_bn")
    return chosen if chosen is not None else flat.get("model.pretrained") is not None


def check_resumable(saved: dict, current: dict, path: str | Path) -> None:
    """ConfigError naming the ``STATE_KEYS`` that differ between a checkpoint's config and this
    one, and a change of frozen BatchNorm (``model.freeze_bn``, or ``model.pretrained`` when
    that is null), which changes the optimizer's parameter groups."""
    before, after = _flatten(saved), _flatten(current)
    changed = [f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in STATE_KEYS if before.get(key) != after.get(key)]
    if _frozen_bn(before) != _frozen_bn(after):
        changed.append(f"model.freeze_bn (BatchNorm frozen, null follows model.pretrained): {_frozen_bn(before)} -> {_frozen_bn(after)}")
    if changed:
        raise ConfigError(
            f"cannot resume from {path}: its state was made with other settings ({'; '.join(changed)}); "
            "set them back, or start a new run with --resume none (or another output_dir)"
        )


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
