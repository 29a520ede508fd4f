"""Shared recipe machinery that needs no model: the training loop's progress output."""

from __future__ import annotations

import pytest
import torch

from adaptive_depth.losses import LossTerms
from recipes import loop


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
