"""Is a saved run (or checkpoint) compatible with this run? One check for every caller.

A run records what it is in ``run.json`` and in every checkpoint's state: recipe, task, model,
config and the fingerprint of its data rows (:func:`recipes.run.data.split_fingerprint`).
:func:`check_compatible` compares such a record with a :class:`RunIdentity` and refuses, with a
:class:`~recipes.run.errors.ResumeMismatchError` that says what differs and how to fix it, a run
of another recipe, task or model, a config that differs outside the keys the caller allows, or
other data rows; when only the data folder moved (same rows) it logs a warning. Its callers:

* ``--resume`` (:class:`recipes.run.composer.Run`): the checkpoint against this run; the method's
  ``resume_allowed_keys`` may differ;
* ``--stage1-from``: the source run's checkpoint; its ``stage2_keys`` may differ too;
* ``benchmarks.tradeoff``: a finished run it would reuse (only threads and the evaluation batch
  size may differ);
* ``benchmarks.calibrated``, ``benchmarks.heads`` and ``python -m recipes.heldout``
  (:func:`recipes.run.trained.checked_rows`): the data folder they read a finished run's rows from.

Example:
    >>> config_differences({"seed": 1, "stage1_epochs": 2}, {"seed": 2, "stage1_epochs": 3}, ["stage1_epochs"])
    ['seed: 1 -> 2']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipes.run.errors import ResumeMismatchError
from recipes.run.logs import logger

__all__ = ["RunIdentity", "check_compatible", "compare_data", "config_differences", "same_model"]


@dataclass(frozen=True)
class RunIdentity:
    """What a run is, as its records state it.

    Attributes:
        recipe: the method's name.
        task: the GLUE task.
        model: the resolved ``--model`` (a folder or hub id).
        config: the config as a JSON-ready dict (:func:`recipes.run.config.config_to_dict`).
        config_class: the config dataclass (its defaults stand in for keys a record lacks).
        data: :func:`recipes.run.data.split_fingerprint` of the rows the run reads.
    """

    recipe: str
    task: str
    model: str
    config: Mapping[str, Any]
    config_class: type
    data: Mapping[str, Any]


def check_compatible(saved: Mapping[str, Any], current: RunIdentity, *, what: str, allowed: Iterable[str],
                     fix: str | None, made: str = "was made") -> None:
    """Refuse a saved run that is not ``current``'s; warn when only its data folder moved.

    Args:
        saved: the saved record: ``recipe``, ``task``, ``model``, ``config`` and ``data`` (``run.json``
            or a checkpoint's state); a missing ``model`` is not checked.
        current: this run.
        what: the saved run in the messages (``"the checkpoint in runs/x/checkpoint"``).
        allowed: config keys that may differ (``task`` is compared on its own).
        fix: how to proceed instead of making them agree (``"start a new run ..."``), or ``None``.
        made: the verb of the config message: ``"<what> <made> with another config"``.

    Raises:
        ResumeMismatchError: another recipe, task or model, a config key outside ``allowed`` that
            differs, or other data rows (or no data fingerprint).
    """
    otherwise = f", or {fix}" if fix else ""
    for key, expected in (("recipe", current.recipe), ("task", current.task)):
        if saved.get(key) != expected:
            raise ResumeMismatchError(f"{what} is a run of {key} {saved.get(key)!r}, this run is {expected!r}"
                                      f"{'; ' + fix if fix else ''}")
    if saved.get("model") is not None and not same_model(str(saved["model"]), current.model):
        raise ResumeMismatchError(f"{what} was trained from model {saved['model']}, this run loads {current.model}; "
                                  f"use the same --model{otherwise}")
    allowed = tuple(dict.fromkeys(allowed))
    differences = config_differences(saved.get("config") or {}, current.config, ("task", *allowed),
                                     current.config_class)
    if differences:
        raise ResumeMismatchError(f"{what} {made} with another config ({'; '.join(differences)}); only "
                                  f"{', '.join(allowed)} may differ: use the same values{otherwise}")
    moved = compare_data(saved.get("data"), current.data, what, fix)
    if moved:
        logger.warning("%s", moved)


def same_model(saved: str, current: str) -> bool:
    """Whether two model names (local folders or hub ids) name the same model."""
    return saved == current or Path(saved).expanduser().resolve() == Path(current).expanduser().resolve()


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], allowed: Iterable[str],
                       config_class: type | None = None) -> list[str]:
    """``key: saved -> current`` for every config key that differs, except the ``allowed`` ones.

    With ``config_class`` (a config dataclass), a key that ``saved`` lacks is no difference when
    ``current`` holds that key's default: an option added after the run was made, whose default
    is what the run did.
    """
    allowed = set(allowed)
    defaults = {} if config_class is None else {
        field.name: field.default for field in dataclasses.fields(config_class)
        if field.default is not dataclasses.MISSING}
    keys = sorted((set(saved) | set(current)) - allowed)
    return [f"{key}: {saved.get(key, '(absent)')!r} -> {current.get(key, '(absent)')!r}"
            for key in keys if saved.get(key) != current.get(key)
            and not (key not in saved and key in defaults and current.get(key) == defaults[key])]


def compare_data(saved: Mapping[str, Any] | None, current: Mapping[str, Any], what: str,
                 fix: str | None = None) -> str | None:
    """A warning when only the data folder moved (same rows), ``None`` when all agrees.

    Raises:
        ResumeMismatchError: the rows differ (or ``saved`` records none).
    """
    otherwise = f", or {fix}" if fix else ""
    if not saved or "sha256" not in saved:
        raise ResumeMismatchError(f"{what} records no data fingerprint, so it cannot be checked to use the same "
                                  f"data{'; ' + fix if fix else ''}")
    if saved["sha256"] != current["sha256"] or saved.get("rows") != current["rows"]:
        raise ResumeMismatchError(
            f"{what} was made on other data ({saved.get('data_dir')}, rows {saved.get('rows')}) than this run "
            f"({current['data_dir']}, rows {current['rows']}); use the same --data-dir and max_*_rows{otherwise}"
        )
    if saved.get("data_dir") != current["data_dir"]:
        return (f"{what} read its data from {saved.get('data_dir')}, this run from {current['data_dir']}; the rows are "
                "identical, so it continues")
    return None
