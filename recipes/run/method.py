"""Training methods: what differs between SmartBERT and the baselines, as data the run composes.

A :class:`Method` is a record of small functions (how to build the trained modules, which
parameters stage 1 trains at which learning rate, what stage 2 trains, how to evaluate) and
a few settings. :class:`recipes.run.composer.Run` composes any method with the loops every method
shares (held-out selection, two stages, checkpoints and ``--resume``, the dev sweep,
calibration, ``results.json``); there is no base class to inherit from. The trained module's
``forward(batch, stage, **options)`` returns the stage's :class:`~adaptive_depth.losses.LossTerms`
(keeping the loss inside ``forward`` lets DistributedDataParallel wrap it).

:data:`METHODS` maps names to methods (``python -m recipes.<name>``, ``benchmarks.tradeoff``);
:func:`register_method` adds one (see ``docs/guide.md``, "Add a new method").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from recipes.glue import GlueTask
from recipes.run.config import RESUME_ALLOWED_KEYS
from recipes.run.errors import ConfigError
from recipes.run.sweep import SweepSetting

__all__ = ["BUILTIN_METHODS", "METHODS", "Method", "get_method", "register_method"]


def _no_options(config: Any, epoch: int) -> dict[str, Any]:
    return {}


def _every_epoch(config: Any, epoch: int) -> bool:
    return True


def _nothing_frozen(module: nn.Module, config: Any, epoch: int) -> list[nn.Parameter]:
    return []


def _no_extra_results(config: Any, task: GlueTask, rows: list[dict[str, Any]],
                      majority: dict[str, float] | None) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Method:
    """One training method.

    Attributes:
        name: ``python -m recipes.<name>``; ``results.json["recipe"]``; config files
            ``recipes/configs/<name>_<task>.yaml``.
        description: one line for ``--help`` and the records.
        config_class: the config dataclass (extends :class:`~recipes.run.config.RecipeConfig`).
        build_model: ``(backbone, config, task) -> module`` with an ``encoder``
            (:class:`~adaptive_depth.AdaptiveEncoder`) and ``forward(batch, stage, **options)``
            returning :class:`~adaptive_depth.losses.LossTerms`. The encoder's own gate threshold
            (``encoder.adaptive_config.gate_threshold``) is the one the held-out evaluation, the
            sweep, the calibration and the saved model use.
        stage1_param_groups: ``(module, config) -> AdamW groups`` of stage 1.
        sweep_settings: ``(config, task, num_steps) -> settings`` of the dev sweep (full depth
            first); the first one with an exit criterion is the one the run calibrates.
        stage2_modules: ``module -> modules`` that stage 2 trains (everything else is frozen);
            ``None`` for a one-stage method.
        stage1_options: ``(config, epoch) -> keyword arguments`` of the stage-1 forward
            (e.g. SmartBERT's gate mode), logged and shown in the progress bar.
        extra_results: ``(config, task, sweep rows, majority-class metrics) -> fields`` added to
            ``results.json["extras"]``.
        heldout_gate_mode: gate mode of the held-out evaluation that picks the best epoch.
        stage1_selectable: ``(config, epoch) -> bool``: whether stage-1 epoch ``epoch`` (0-based)
            may be picked as the best (SmartBERT: not a gate warm-up epoch, whose gates are
            untrained, so that its model would skip nothing).
        stage1_frozen: ``(module, config, epoch) -> parameters`` that stage-1 epoch ``epoch``
            (0-based) leaves as they are (e.g. SmartBERT's backbone while only its gates train,
            ``gated_epochs_train="gates"``); the other parameters of the optimizer train.
        stage1_untrained_prefixes: state-dict prefixes of modules stage 1 never trains; they
            are left out of the best stage-1 weights and kept when those are reloaded.
        resume_allowed_keys: config keys a resumed run may change.
        stage2_keys: config keys that change only stage 2 (and the evaluation after it): a run
            started from another run's stage 1 (``--stage1-from``) may differ from it in these,
            in the operating-point keys (``recipes.run.config.OPERATING_POINT_KEYS``) and in the
            ``resume_allowed_keys`` other than ``stage1_epochs``.
    """

    name: str
    description: str
    config_class: type
    build_model: Callable[[nn.Module, Any, GlueTask], nn.Module]
    stage1_param_groups: Callable[[nn.Module, Any], list[dict[str, Any]]]
    sweep_settings: Callable[[Any, GlueTask, int], list[SweepSetting]]
    stage2_modules: Callable[[nn.Module], list[nn.Module]] | None = None
    stage1_options: Callable[[Any, int], dict[str, Any]] = _no_options
    extra_results: Callable[[Any, GlueTask, list[dict[str, Any]], dict[str, float] | None], dict[str, Any]] = \
        _no_extra_results
    heldout_gate_mode: str = "run"
    stage1_selectable: Callable[[Any, int], bool] = _every_epoch
    stage1_frozen: Callable[[nn.Module, Any, int], list[nn.Parameter]] = _nothing_frozen
    stage1_untrained_prefixes: tuple[str, ...] = ()
    resume_allowed_keys: tuple[str, ...] = RESUME_ALLOWED_KEYS
    stage2_keys: tuple[str, ...] = ("stage2_epochs", "stage2_lr")

    @property
    def has_stage2(self) -> bool:
        """Whether the method trains intermediate heads in a second stage."""
        return self.stage2_modules is not None


METHODS: dict[str, Method] = {}
# Modules that register the shipped methods when imported (in the order benchmarks.tradeoff shows them).
BUILTIN_METHODS = {"finetune": "recipes.finetune", "deebert": "recipes.deebert", "fastbert": "recipes.fastbert",
                   "pabee": "recipes.pabee", "smartbert": "recipes.smartbert"}


def register_method(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (a name may be registered once); returns it."""
    existing = METHODS.get(method.name)
    if existing is not None and existing is not method:
        raise ValueError(f"a method named {method.name!r} is already registered.")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``, importing the shipped ones on first use.

    Raises:
        ConfigError: no method of that name (the message lists the known ones).
    """
    if name not in METHODS and name in BUILTIN_METHODS:
        importlib.import_module(BUILTIN_METHODS[name])
    if name not in METHODS:
        known = sorted(set(METHODS) | set(BUILTIN_METHODS))
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(known)}")
    return METHODS[name]
