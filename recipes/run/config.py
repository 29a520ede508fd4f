"""Recipe configs: dataclasses validated in ``__post_init__``, read from YAML, then ``key=value``
overrides from the command line (:func:`load_config`); unknown keys are errors."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptive_depth.pvalues import check_risk_level
from recipes.glue import get_task
from recipes.run.device import check_device_name
from recipes.run.errors import ConfigError

__all__ = ["CONFIG_DIR", "OPERATING_POINT_KEYS", "RESUME_ALLOWED_KEYS", "RecipeConfig", "config_to_dict",
           "default_config_file", "load_config", "parse_overrides"]

CONFIG_DIR = Path(__file__).parent.parent / "configs"
# Config keys a resumed run may change: settings that do not change what is trained (threads,
# evaluation batch size, the device: recipes.run.device warns that a device change is not
# bit-identical) and the epoch keys, as far as recipes.run.resume.check_resume_epochs
# allows (stage2_epochs until stage 2 starts). Recipes add their sweep thresholds.
RESUME_ALLOWED_KEYS = ("stage1_epochs", "stage2_epochs", "torch_threads", "eval_batch_size", "device")
# Config keys that say how the operating point is chosen after training (nothing trained depends on them).
OPERATING_POINT_KEYS = ("calibration_budget", "operating_point", "certify_max_risk", "certify_delta")


@dataclass
class RecipeConfig:
    """Hyper-parameters every recipe has; each recipe's config extends it (defaults: the
    official SmartBERT RTE run, docs/design.md).

    Attributes:
        task: GLUE task name (set by ``--task``).
        seed: seeds model init, shuffling and the held-out split.
        max_length: tokens per example, special tokens included (longer ones are truncated).
        batch_size: training batch size (per process).
        eval_batch_size: batch size of held-out evaluation and of the dev sweep.
        holdout_fraction: share of train held out for stage-1 model selection.
        max_train_rows, max_eval_rows: use only the first rows of train / dev (0: all).
        stage1_epochs, stage1_lr: epochs and backbone learning rate of stage 1.
        stage1_head_lr: stage-1 learning rate of the new modules (heads...); 0 uses ``stage1_lr``.
        stage2_epochs, stage2_lr: epochs and learning rate of stage 2 (the intermediate heads);
            ignored by one-stage methods.
        weight_decay, warmup_ratio, max_grad_norm: AdamW and linear-schedule settings.
        head_inner_size: width of the attention exit heads' self-attention.
        padded_length: length the paper's FLOPs convention counts at.
        bucket_by_length: batch training examples of similar length (less padding); one process only:
            under ``torchrun`` each rank draws from a seeded ``DistributedSampler``, unbucketed.
        torch_threads: ``torch.set_num_threads`` (0: leave the default).
        device: where the run trains and evaluates, in fp32: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``
            (under ``torchrun``, ``"cuda"``: each process uses ``cuda:LOCAL_RANK``); checked to
            exist when the run starts (:mod:`recipes.run.device`).
        calibration_budget: after the sweep, the exit threshold is chosen on the held-out part of
            train so that the relative cost (total exact MACs over total full-depth MACs) is at
            most this; the model is saved to ``<run>/model`` at that operating point.
        operating_point: how that threshold is chosen: ``"budget"`` (``calibration_budget``, a
            point estimate on the held-out rows) or ``"certified"`` (the cheapest threshold whose
            disagreement with full depth is certified at most ``certify_max_risk`` with
            probability ``1 - certify_delta``, :func:`adaptive_depth.certify.certify_threshold`;
            classification tasks only).
        certify_max_risk, certify_delta: the certified operating point's risk and confidence, each
            in ``(0, 1)``. The default risk, 5%, is certifiable with the few hundred held-out rows
            of the small GLUE tasks (at 300 rows nothing under 1% is).
    """

    task: str = "rte"
    seed: int = 42
    max_length: int = 128
    batch_size: int = 16
    eval_batch_size: int = 32
    holdout_fraction: float = 0.1
    max_train_rows: int = 0
    max_eval_rows: int = 0
    stage1_epochs: int = 5
    stage1_lr: float = 2e-5
    stage1_head_lr: float = 0.0
    stage2_epochs: int = 4
    stage2_lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    head_inner_size: int = 128
    padded_length: int = 128
    bucket_by_length: bool = True
    torch_threads: int = 0
    device: str = "cpu"
    calibration_budget: float = 0.5
    operating_point: str = "budget"
    certify_max_risk: float = 0.05
    certify_delta: float = 0.05

    # Validation lists (unannotated, so not dataclass fields); subclasses extend them.
    _positive = ("max_length", "batch_size", "eval_batch_size", "stage1_epochs", "head_inner_size", "padded_length")
    _non_negative = ("max_train_rows", "max_eval_rows", "stage2_epochs", "weight_decay", "max_grad_norm",
                     "torch_threads", "stage1_head_lr")
    _strictly_positive = ("stage1_lr", "stage2_lr")

    def __post_init__(self) -> None:
        try:
            self.task = get_task(self.task).name
        except ValueError as error:
            raise ConfigError(str(error)) from None
        for name in self._positive:
            if not getattr(self, name) >= 1:  # also refuses NaN
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in self._non_negative:
            if not getattr(self, name) >= 0:  # NaN too: a NaN weight decay, clip norm or loss weight is no setting
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in self._strictly_positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        check_device_name(self.device)
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if not 0.0 < self.calibration_budget <= 1.0:
            raise ConfigError(f"calibration_budget must be in (0, 1], got {self.calibration_budget}")
        if self.operating_point not in ("budget", "certified"):
            raise ConfigError(f"operating_point must be 'budget' or 'certified', got {self.operating_point!r}")
        if self.operating_point == "certified" and get_task(self.task).is_regression:
            raise ConfigError(f"operating_point=certified certifies disagreement with full depth, a classification "
                              f"risk; {self.task} is a regression task: use operating_point=budget")
        for name in ("certify_max_risk", "certify_delta"):
            try:
                check_risk_level(getattr(self, name), name)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_length < 4:
            raise ConfigError(f"max_length must be >= 4 tokens (special tokens included), got {self.max_length}")
        if self.max_length > self.padded_length:
            raise ConfigError(f"max_length ({self.max_length}) must be <= padded_length ({self.padded_length})")


_SCIENTIFIC = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)[eE][+-]?\d+")


def _option_value(value: Any) -> Any:
    """An option of a dict-typed key as given, except ``"4e-2"``-style strings, which become floats (YAML 1.1 and
    the command line leave scientific notation without a dot as a string; top-level floats are coerced by type)."""
    return float(value) if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()) else value


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML value to the dataclass field's type, or raise :class:`ConfigError`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (arg for arg in args if arg is not type(None)):
            try:
                return _coerce(key, value, option)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError("; ".join(errors))
    if origin is dict:
        if isinstance(value, str):  # a name alone: {"name": value}
            return {"name": value}
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} must be a name or a mapping of options, got {value!r}")
        return {name: _option_value(option) for name, option in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        item_type = args[0] if args else Any
        return [_coerce(key, item, item_type) for item in value]
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if annotation in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            value = annotation(value)
        except ValueError:
            pass
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
    return value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["lr=1e-4", "epochs=2"]`` -> ``{"lr": 1e-4, "epochs": 2}`` (values parsed as YAML).

    A dotted key sets one option of a nested key: ``gate_objective.weight=2`` ->
    ``{"gate_objective.weight": 2}``, merged into ``gate_objective`` by :func:`load_config`."""
    import yaml

    parsed: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        value = yaml.safe_load(raw) if raw.strip() else None
        parsed[key] = value
    return parsed


def load_config(cls: type, path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = (), **defaults: Any) -> Any:
    """Build a config dataclass from ``defaults``, then a YAML file, then ``key=value`` overrides.

    Args:
        cls: a dataclass whose ``__post_init__`` validates the values.
        path: YAML file of ``key: value`` pairs, or ``None``. A nested key (e.g. ``gate_objective``)
            holds a mapping of options or a name alone.
        overrides: ``key=value`` strings; values are parsed as YAML (``1e-4``, ``[0.1, 0.2]``); a
            dotted key (``gate_objective.weight=2``) changes one option of a nested key and keeps
            the others (from the file, else the field's default). Setting a nested key's ``name``
            starts from that name's own defaults: ``gate_objective.name=budget`` drops the options
            of the previous objective.
        **defaults: values applied before the file (e.g. ``task`` from ``--task``).

    Raises:
        ConfigError: unreadable file, a key the dataclass does not have (the message lists the
            known keys), a value of the wrong type, or a failed validation.
    """
    import yaml

    fields = {field.name: field for field in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    sources: list[tuple[str, Mapping[str, Any]]] = [("defaults", defaults)]
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error}") from error
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of key: value, got {type(loaded).__name__}")
        sources.append((str(path), loaded))
    sources.append(("command line", parse_overrides(overrides)))
    for origin, mapping in sources:
        for key, value in mapping.items():
            head, _, option = key.partition(".")
            if head not in fields or (option and typing.get_origin(hints[head]) is not dict):
                raise ConfigError(
                    f"unknown config key {key!r} (from {origin}); known keys: {', '.join(sorted(fields))}"
                )
            if option:
                current = values[head] if head in values else _field_default(fields[head])
                merged = {} if option == "name" else dict(current)
                values[head] = {**merged, option: _option_value(value)}
            else:
                values[key] = _coerce(key, value, hints[key])
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"invalid config: {error}") from error


def _field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return field.default


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def default_config_file(recipe: str, task: str) -> Path | None:
    """``recipes/configs/<recipe>_<task>.yaml`` if shipped."""
    path = CONFIG_DIR / f"{recipe}_{task}.yaml"
    return path if path.is_file() else None
