"""Shared recipe machinery that needs no model: the training loop's progress output."""

from __future__ import annotations

import pytest
import torch

from adaptive_depth.losses import LossTerms
from recipes.run import loop


def test_progress_bar_is_quiet_when_stderr_is_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    """Redirected to a log file, the bar must not redraw on every batch (it buried the log lines)."""
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    batches = [{"labels": torch.zeros(2)} for _ in range(200)]
    stats = loop.run_epoch(batches, lambda batch: LossTerms({"task": (weight - 1).pow(2).sum()}), optimizer, [weight],
                           "quiet epoch")
    assert stats.samples == 400
    redraws = capsys.readouterr().err.count("quiet epoch")
    assert 1 <= redraws <= 3, redraws


def test_an_option_added_after_a_run_counts_as_its_default() -> None:
    """A run made before ``gate_warmup_epochs`` existed is the same config as one asking for its
    default (0: what the run did), and a different one when another value is asked for."""
    from recipes.run.config import config_to_dict, load_config
    from recipes.run.compat import config_differences
    from recipes.smartbert import SmartBertConfig

    current = config_to_dict(load_config(SmartBertConfig, None, ["gate_objective=budget"], task="mrpc"))
    saved = {key: value for key, value in current.items() if key != "gate_warmup_epochs"}
    assert config_differences(saved, current, (), SmartBertConfig) == []
    assert config_differences(saved, current, ()) == ["gate_warmup_epochs: '(absent)' -> 0"]
    asked = {**current, "gate_warmup_epochs": 1}
    assert config_differences(saved, asked, (), SmartBertConfig) == ["gate_warmup_epochs: '(absent)' -> 1"]
    assert config_differences({**saved, "seed": 1}, current, (), SmartBertConfig) == ["seed: 1 -> 42"]
