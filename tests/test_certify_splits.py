"""``benchmarks.certify_splits`` on a tiny random model: the cached grid gives what certify_threshold
gives on the calibration rows, and the command writes its table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adaptive_depth import AdaptivePipeline
from adaptive_depth.certify import certify_threshold
from benchmarks import certify_splits
from tests.conftest import requires_minilm
from tests.conftest import tiny_minilm_encoder

pytestmark = [requires_minilm, pytest.mark.usefixtures("one_thread")]

WORDS = "the a cat dog sat ran on under mat rug quickly slowly red blue big small".split()


def random_texts(count: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(n),), generator=generator))
            for n in torch.randint(2, 12, (count,), generator=generator)]


@pytest.fixture(scope="module")
def model_and_rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("splits")
    encoder, tokenizer = tiny_minilm_encoder()
    encoder.adaptive_config.mode = "exit_only"  # no gate: the safest threshold agrees with full depth
    model = encoder.save_pretrained(folder / "model", tokenizer=tokenizer)
    texts, pairs = random_texts(240, 1), random_texts(240, 2)
    rows = folder / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": a, "text_pair": b, "label": str(i % 2)}) + "\n"
                            for i, (a, b) in enumerate(zip(texts, pairs))))
    return model, rows


def test_the_cached_grid_chooses_what_certify_threshold_chooses(model_and_rows: tuple[Path, Path]) -> None:
    model, rows_file = model_and_rows
    pipeline = AdaptivePipeline.from_pretrained(model)
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    texts, pairs = [row["text"] for row in rows], [row["text_pair"] for row in rows]
    order, batches = [], []
    for indices, inputs in pipeline.batches(texts, pairs):
        order += indices
        batches.append(inputs)
    grid = certify_splits.run_grid(pipeline.engine, batches, "disagreement")
    assert grid.losses.shape == (len(grid.thresholds), 240)
    for split in range(2):
        calibration, _ = certify_splits.draw_split(0, split, 240, 120)
        chosen = certify_splits.choose(grid, calibration, max_risk=0.3, delta=0.1)["certified"]
        originals = [order[position] for position in calibration.tolist()]
        part = [inputs for _, inputs in pipeline.batches([texts[i] for i in originals], [pairs[i] for i in originals])]
        try:
            certificate = certify_threshold(pipeline.engine, part, max_risk=0.3, delta=0.1, thresholds=grid.thresholds)
        except ValueError:
            assert chosen is None
        else:
            assert grid.thresholds[chosen] == certificate.threshold
            assert grid.cost_of(chosen, calibration) == pytest.approx(certificate.relative_cost)


def test_the_command_writes_its_table(model_and_rows: tuple[Path, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    model, rows = model_and_rows
    out = tmp_path / "splits.json"
    assert certify_splits.main([str(model), "--input", str(rows), "--label-column", "label", "--max-risk", "0.1", "0.3",
                                "--delta", "0.1", "--splits", "20", "--budget", "0.9", "--no-progress", "--json",
                                str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["rows"] == 240 and record["command"].startswith("python -m benchmarks.certify_splits")
    assert {"date", "machine", "grid"} <= set(record)
    rules = [(row["rule"], row["max_risk"]) for row in record["results"]]
    assert rules == [(rule, risk) for risk in (0.1, 0.3) for rule in ("certified", "point estimate", "budget 0.9")]
    for row in record["results"]:
        low, high = row["violation_rate_95"]
        assert 0.0 <= low <= row["violation_rate"] <= high <= 1.0 and row["splits"] == 20
    assert "| certified | 0.1 | 0.1 |" in capsys.readouterr().out
    assert certify_splits.main([str(model), "--input", str(rows), "--splits", "0", "--json", str(out)]) == 2
    assert certify_splits.main([str(model), "--input", str(rows), "--max-risk", "1.5", "--json", str(out)]) == 2



def test_bootstrap_draws_keep_the_certified_risk_on_the_population() -> None:
    """Rows as the population, calibration drawn from it with replacement: the certified rule's true
    (population) risk exceeds max_risk in at most about delta of the draws; the point estimate's far more."""
    generator = torch.Generator().manual_seed(0)
    uniform = torch.rand(600, generator=generator)
    levels = torch.linspace(0.0, 0.2, 21)  # grid point j disagrees on rows with u < levels[j]
    losses = (uniform.unsqueeze(0) < levels.unsqueeze(1)).double()
    macs = (1000 - 40 * torch.arange(21)).unsqueeze(1).expand(21, 600).clone()
    grid = certify_splits.GridResults(levels.tolist(), losses, macs, torch.full((600,), 1000), "disagreement")
    calibration, test = certify_splits.draw_bootstrap(0, 3, 600, 300)
    assert len(calibration) == 300 and len(set(calibration.tolist())) < 300 and torch.equal(test, torch.arange(600))
    rows = certify_splits.split_rates(grid, max_risk=0.05, delta=0.1, splits=400, calibration_fraction=0.5, seed=1,
                                      draw="bootstrap")
    rates = {row["rule"]: row["violation_rate"] for row in rows}
    assert rates["certified"] <= 0.1 + 3 * (0.1 * 0.9 / 400) ** 0.5
    assert rates["point estimate"] > 0.3
    assert all(row["draw"] == "bootstrap" for row in rows)
