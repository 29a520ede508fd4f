"""Integration tests of ``python -m recipes.smartbert`` on synthetic GLUE folders and a tiny BERT.

The CLI runs in-process (``smartbert.main(argv)``) with a 2-layer, hidden-32 random BERT saved
with the all-MiniLM-L6-v2 tokenizer, so each run takes seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from adaptive_depth.engine import AdaptiveInferenceEngine
from recipes import smartbert
from recipes.run import checkpoints, files
from recipes.run.config import load_config
from recipes.run.loop import freeze_for_stage2
from recipes.run.errors import ConfigError
from recipes.glue import EncodedDataset, collate, encode_examples, read_split
from tests.conftest import RECIPE_RUN_MARKS, assert_stage2_trained_only, requires_glue, subprocess_env
from tests.conftest import TINY_SMARTBERT as TINY
from tests.conftest import run_smartbert as run_cli
from tests.glue_fixtures import write_synthetic_glue

pytestmark = RECIPE_RUN_MARKS

def test_end_to_end_writes_results(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = run_cli("--task", "mrpc", "--data-dir", glue_dir, "--model", tiny_model_dir, "--output-dir", out,
                   "stage1_epochs=1", "soft_epochs=1", "stage2_epochs=1", "calibration_budget=0.9", *TINY)
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "plot.png").stat().st_size > 1000
    for key in ("command", "config", "model", "data_dir", "started", "finished", "wall_time_s", "sweep", "history"):
        assert key in results
    assert results["sizes"] == {"train": 36, "heldout": 4, "dev": 16}
    names = [row["name"] for row in results["sweep"]]
    assert names[:2] == ["full", "skip_only"] and "entropy=0.3" in names and len(names) == 9
    full = results["sweep"][0]
    assert full["relative_cost_paper"] == pytest.approx(1.0) and full["mean_layers_run"] == 2.0
    assert full["exit_layer_histogram"] == [0, 16]
    for row in results["sweep"]:
        assert 0.0 <= row["metrics"]["accuracy"] <= 1.0 and 0.0 <= row["metrics"]["f1"] <= 1.0
        # Paper-convention MACs are counted at the padded length, the same for every row, so a
        # row's relative cost is its mean MACs over the full-depth row's.
        assert row["relative_cost_paper"] == pytest.approx(row["mean_macs_paper"] / full["mean_macs_paper"])
        assert row["mean_macs_paper"] > 0 and row["mean_macs_exact"] > 0 and row["ms_per_sample"] > 0
        assert sum(row["exit_layer_histogram"]) == 16
    assert [record["epoch"] for record in results["history"]["stage1"]] == [0]
    assert [record["epoch"] for record in results["history"]["stage2"]] == [0]
    assert set(results["majority_class_baseline"]) == {"accuracy", "f1"}
    assert isinstance(results["extras"]["target_half_cost_within_1pt"]["reached"], bool)

    # The operating point was chosen on held-out rows, within the budget; dev was evaluated there.
    point = results["operating_point"]
    assert point["budget"] == 0.9 and point["calibration"]["relative_cost"] <= 0.9
    assert point["calibration"]["num_rows"] == 4 and point["dev"]["name"].startswith("calibrated entropy=")
    assert sum(point["dev"]["exit_layer_histogram"]) == 16

    # The saved model classifies raw text at that operating point, with no recipe code.
    from adaptive_depth import AdaptivePipeline

    pipeline = AdaptivePipeline.from_pretrained(out / "model")
    assert pipeline.engine.criterion.threshold == point["calibration"]["threshold"]
    dev_rows = read_split(glue_dir, "mrpc", "dev").examples
    predicted = pipeline([row.text_a for row in dev_rows], [row.text_b for row in dev_rows])
    hits = [int(p.label) == row.label for p, row in zip(predicted, dev_rows)]
    assert sum(hits) / len(hits) == pytest.approx(point["dev"]["metrics"]["accuracy"])

    # One call reloads the trained run; full depth reproduces the sweep's dev accuracy.
    encoder, tokenizer, config = smartbert.load_trained(out)
    assert config.task == "mrpc" and not encoder.training
    dev = read_split(glue_dir, "mrpc", "dev").examples
    batch = collate(list(EncodedDataset(encode_examples(dev, tokenizer, config.max_length))), tokenizer.pad_token_id)
    labels = batch.pop("labels")
    predictions = AdaptiveInferenceEngine(encoder, mode="full")(**batch).predictions
    assert float((predictions == labels).double().mean()) == pytest.approx(full["metrics"]["accuracy"])


def test_resume_adds_stage2_to_a_finished_stage1_and_stage2_freezes(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    base = ["--task", "mrpc", "--data-dir", glue_dir, "--model", tiny_model_dir, "--output-dir", out, *TINY]
    assert run_cli(*base, "stage1_epochs=2", "soft_epochs=1", "stage2_epochs=0") == 0
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert (state["stage"], state["epoch"]) == (1, 1)

    caplog.clear()
    assert run_cli(*base, "--resume", "stage1_epochs=2", "soft_epochs=1", "stage2_epochs=1") == 0
    assert "stage 1, epoch 1 completed" in caplog.text
    assert "stage 1 epoch" not in caplog.text  # stage 1 was not trained again
    assert "stage 2 epoch 1/1" in caplog.text
    results = json.loads((out / "results.json").read_text())
    assert [record["epoch"] for record in results["history"]["stage1"]] == [0, 1]
    assert [record["options"]["gate_mode"] for record in results["history"]["stage1"]] == ["soft", "hard"]
    assert [record["epoch"] for record in results["history"]["stage2"]] == [0]

    # Stage 2 reloaded the best stage-1 weights and froze backbone, gates and last head.
    assert_stage2_trained_only(out, trained=("encoder.exit_heads.0.",),
                               frozen_includes=("encoder.backbone.", "encoder.gates.", "encoder.exit_heads.1."))


def test_load_trained_without_stage2_gives_the_best_stage1_weights(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    """A run that stops after stage 1 was evaluated with its best held-out epoch; so is its reload."""
    out = tmp_path / "run"
    assert run_cli("--task", "mrpc", "--data-dir", glue_dir, "--model", tiny_model_dir, "--output-dir", out,
                   "stage1_epochs=2", "soft_epochs=1", "stage2_epochs=0", "entropy_thresholds=[0.3]", *TINY) == 0
    results = json.loads((out / "results.json").read_text())
    # The tiny model does not improve on the 4 held-out rows, so epoch 0 stays the best one and
    # the last checkpoint (epoch 1) holds other weights.
    assert results["best_stage1"]["epoch"] == 0
    best = files.load_weights(out / "stage1_best.safetensors")
    last, _, _ = checkpoints.load_checkpoint(out / "checkpoint")
    key = "encoder.exit_heads.1.classifier.bias"
    assert not torch.equal(best[key], last[key])
    # The saved model (<run>/model) holds the best stage-1 weights ...
    saved, _, _ = smartbert.load_trained(out)
    for name, value in saved.state_dict().items():
        assert torch.equal(value, best[f"encoder.{name}"]), name
    # ... and so does the reload of a run stopped before saving it (from its checkpoint).
    shutil.rmtree(out / "model")
    encoder, _, _ = smartbert.load_trained(out)
    assert torch.equal(encoder.exit_heads[1].classifier.bias, best[key])
    with pytest.raises(checkpoints.CheckpointError, match="not 'deebert'"):
        from recipes import deebert

        deebert.load_trained(out)

    # A bit flipped in the checkpoint's best weights is caught by their recorded checksum.
    stored = out / "checkpoint" / "stage1_best.safetensors"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 1
    stored.write_bytes(bytes(data))  # in place: the published stage1_best.safetensors is another file
    with pytest.raises(checkpoints.CheckpointError, match="checksum differs"):
        smartbert.load_trained(out)


def test_stage2_optimizer_holds_only_intermediate_heads(tiny_model_dir: Path) -> None:
    from transformers import AutoModel

    from adaptive_depth.encoder import AdaptiveEncoder

    config = load_config(smartbert.SmartBertConfig, None, TINY, task="mrpc")
    encoder = AdaptiveEncoder(AutoModel.from_pretrained(tiny_model_dir), num_labels=2, gate_inner_size=16,
                              head_inner_size=16)
    model = smartbert.SmartBertModel(encoder, config)
    trainable = {id(parameter) for parameter in freeze_for_stage2(model, smartbert.METHOD.stage2_modules(model))}
    for name, parameter in model.named_parameters():
        expected = name.startswith("encoder.exit_heads.0.") or name.startswith("contrast2.")
        assert (id(parameter) in trainable) == expected == parameter.requires_grad, name


def test_stage2_exit_objective_picks_the_heads_loss(tiny_model_dir: Path) -> None:
    """Stage 2 trains on the labels by default (eq. 7) and on the last head's softmax with
    ``exit_objective=distill``; either way the last head stays frozen."""
    from transformers import AutoModel

    from adaptive_depth.encoder import AdaptiveEncoder

    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(5, 100, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long),
             "labels": torch.tensor([0, 1, 1, 0])}
    for objective, term in (("labels", "exit_heads"), ("distill", "distillation")):
        config = load_config(smartbert.SmartBertConfig, None, [*TINY, f"exit_objective={objective}"], task="mrpc")
        encoder = AdaptiveEncoder(AutoModel.from_pretrained(tiny_model_dir), num_labels=2, gate_inner_size=16,
                                  head_inner_size=16)
        model = smartbert.SmartBertModel(encoder, config)
        freeze_for_stage2(model, smartbert.METHOD.stage2_modules(model))
        terms = model(batch, stage=2)
        assert list(terms)[0] == term
        terms.total.backward()
        assert all(parameter.grad is None for parameter in encoder.exit_heads[-1].parameters())
        assert all(parameter.grad is not None for parameter in encoder.exit_heads[0].parameters())


def test_stage1_from_another_run_trains_only_stage2(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--stage1-from``: the source's best stage-1 weights, history and best epoch, bit for bit;
    stage 2 changes only the intermediate heads; a source that differs in stage 1 is refused."""
    from safetensors.torch import load_file

    common = ["--task", "mrpc", "--data-dir", glue_dir, "--model", tiny_model_dir, "stage1_epochs=2",
              "soft_epochs=1", "stage2_epochs=1", "exit_objective=distill", "calibration_budget=0.9", *TINY]
    source, variant = tmp_path / "source", tmp_path / "variant"
    assert run_cli(*common, "--output-dir", source) == 0
    assert run_cli(*common, "--output-dir", variant, "exit_objective=labels", "stage2_lr=1e-3", "--stage1-from", source) == 0
    old, new = (json.loads((folder / "results.json").read_text()) for folder in (source, variant))
    assert new["history"]["stage1"] == old["history"]["stage1"] and new["best_stage1"] == old["best_stage1"]
    assert len(new["history"]["stage2"]) == 1 and new["config"]["exit_objective"] == {"name": "labels"}
    best_old, best_new = (load_file(folder / "stage1_best.safetensors") for folder in (source, variant))
    assert best_old.keys() == best_new.keys() and all(torch.equal(best_old[key], best_new[key]) for key in best_old)
    (old_encoder, *_), (new_encoder, *_) = (smartbert.load_trained(folder) for folder in (source, variant))
    trained_old, trained_new = old_encoder.state_dict(), new_encoder.state_dict()
    last = f"exit_heads.{old_encoder.num_steps - 1}."
    for key, value in trained_old.items():
        intermediate = key.startswith("exit_heads.") and not key.startswith(last)
        assert torch.equal(value, trained_new[key]) != intermediate, key
    # resuming the new run finds its own checkpoint, at the end of its stage 2
    assert json.loads((variant / "checkpoint" / "state.json").read_text())["stage"] == 2
    capsys.readouterr()

    assert run_cli(*common, "--output-dir", tmp_path / "x", "stage1_lr=1e-4", "--stage1-from", source) == 2
    assert "trained stage 1 with another config (stage1_lr" in capsys.readouterr().err
    assert run_cli(*common, "--output-dir", tmp_path / "y", "--stage1-from", tmp_path / "nowhere") == 2
    assert "give the folder of a smartbert run that finished stage 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing written before the checks


def test_resume_rejects_corrupt_and_mismatched_checkpoints(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    base = ["--task", "mrpc", "--data-dir", glue_dir, "--model", tiny_model_dir, "--output-dir", out, *TINY]
    assert run_cli(*base, "stage1_epochs=1", "soft_epochs=1", "stage2_epochs=0") == 0
    capsys.readouterr()

    assert run_cli(*base[:-len(TINY)], *TINY[:1], "head_inner_size=8", *TINY[2:], "--resume", "stage1_epochs=2") == 2
    assert "head_inner_size" in capsys.readouterr().err

    weights = out / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert run_cli(*base, "--resume", "stage1_epochs=2") == 2
    assert "corrupt" in capsys.readouterr().err

    assert run_cli(*base[:-len(TINY) - 2], "--output-dir", tmp_path / "empty", "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_bad_inputs_are_clear_errors(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("--task", "nope", "--data-dir", glue_dir) == 2
    err = capsys.readouterr().err
    assert "Unknown GLUE task" in err and "mrpc" in err and "rte" in err

    assert run_cli("--task", "mrpc", "--data-dir", tmp_path / "missing") == 2
    assert "does not exist" in capsys.readouterr().err

    assert run_cli("--task", "mrpc", "--data-dir", glue_dir, "learning_rate=1") == 2
    err = capsys.readouterr().err
    assert "unknown config key 'learning_rate'" in err and "stage1_lr" in err

    assert run_cli("--task", "mrpc", "--data-dir", glue_dir, "batch_size=many") == 2
    assert "batch_size" in capsys.readouterr().err

    bad = tmp_path / "bad-glue"
    write_synthetic_glue(bad, "mrpc", n_train=8, n_dev=4)
    train = bad / "MRPC" / "train.tsv"
    lines = train.read_text(encoding="utf-8-sig").splitlines()
    lines[1] = "7" + lines[1][1:]
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert run_cli("--task", "mrpc", "--data-dir", bad, "--model", tiny_model_dir, "--output-dir", tmp_path / "r") == 2
    assert "label '7'" in capsys.readouterr().err

    from transformers import GPT2Config, GPT2Model

    gpt = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=30522, n_positions=64)).save_pretrained(gpt)
    for name in os.listdir(tiny_model_dir):
        if "token" in name or name == "vocab.txt":
            (gpt / name).write_bytes((tiny_model_dir / name).read_bytes())
    assert run_cli("--task", "mrpc", "--data-dir", glue_dir, "--model", gpt, "--output-dir", tmp_path / "g", *TINY) == 2
    err = capsys.readouterr().err
    assert "gpt2" in err and "bert" in err


def test_truncation_is_counted(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path,
                               caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    assert run_cli("--task", "mrpc", "--data-dir", glue_dir, "--model", tiny_model_dir, "--output-dir", out,
                   "max_length=8", "stage1_epochs=1", "stage2_epochs=0", "entropy_thresholds=[0.3]", *TINY) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["num_truncated"]["train"] == 36
    assert "longer than max_length=8 tokens were truncated" in caplog.text


@requires_glue
def test_real_mrpc_rows(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run_cli("--task", "mrpc", "--model", tiny_model_dir, "--output-dir", out, "max_train_rows=40",
                   "max_eval_rows=16", "stage1_epochs=1", "soft_epochs=1", "stage2_epochs=1", *TINY) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["sizes"] == {"train": 36, "heldout": 4, "dev": 16}
    assert results["data_dir"] == os.environ["GLUE_DIR"]


CONFIGS = sorted((Path(smartbert.__file__).parent / "configs").glob("smartbert_*.yaml"))


def test_configs_are_shipped() -> None:
    assert any(path.name == "smartbert_mrpc.yaml" for path in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=[path.name for path in CONFIGS])
def test_shipped_config_is_valid(path: Path) -> None:
    """A task's default config (``smartbert_<task>.yaml``) names its task; a named config
    (``smartbert_budget.yaml``) serves any task and its launch command passes it with ``--config``."""
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith("# python -m recipes.smartbert --task "), first_line
    task = first_line.split("--task ")[1].split()[0]
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    config = load_config(smartbert.SmartBertConfig, path, (), task=task)
    if path.stem == f"smartbert_{task}":
        assert config.task == raw["task"] == task
    else:
        assert "task" not in raw and f"--config recipes/configs/{path.name}" in first_line


def test_overrides_are_typed_and_validated() -> None:
    config = load_config(smartbert.SmartBertConfig, None, ["stage1_lr=1e-4", "entropy_thresholds=[0.1]"],
                                task="rte")
    assert config.stage1_lr == 1e-4 and config.entropy_thresholds == [0.1]
    with pytest.raises(ConfigError, match="holdout_fraction"):
        load_config(smartbert.SmartBertConfig, None, ["holdout_fraction=1.5"], task="rte")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(smartbert.SmartBertConfig, None, ["stage1_lr"], task="rte")
    with pytest.raises(ConfigError, match="unknown exit objective 'kd'"):
        load_config(smartbert.SmartBertConfig, None, ["exit_objective=kd"], task="rte")
    with pytest.raises(ConfigError, match=r"target_cost must be in \[0, 1\]"):
        load_config(smartbert.SmartBertConfig, None, ["gate_objective.name=budget", "gate_objective.target_cost=1.7"],
                    task="rte")
    with pytest.raises(ConfigError, match="unknown config key 'skip_weight'"):
        load_config(smartbert.SmartBertConfig, None, ["skip_weight=0.1"], task="rte")
    with pytest.raises(ConfigError, match=r"regression_tolerances must be >= 0 \(score units\)"):
        load_config(smartbert.SmartBertConfig, None, ["regression_tolerances=[0.1,-1]"], task="stsb")


@pytest.mark.parametrize("override, message", [
    ("weight_decay=.nan", "weight_decay must be >= 0, got nan"),  # AdamW failed after the run folder was made
    ("max_grad_norm=.nan", "max_grad_norm must be >= 0, got nan"),  # gradients were silently never clipped
    ("eta1=.nan", "eta1 must be >= 0, got nan"),  # the contrastive term was silently dropped
    ("entropy_thresholds=[.nan]", "entropy_thresholds must be one or more values >= 0"),  # failed after training
    ("entropy_thresholds=[]", "entropy_thresholds must be one or more values >= 0"),  # saved at full depth
    ("regression_tolerance=-1", r"regression_tolerance must be >= 0 \(score units\)"),  # never exited
])
def test_nan_and_empty_settings_are_refused_before_any_work(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(smartbert.SmartBertConfig, None, [override], task="stsb")


def test_options_take_scientific_notation_without_a_dot() -> None:
    """YAML 1.1 and the command line leave ``4e-2`` a string; top-level floats were converted, options were not."""
    config = load_config(smartbert.SmartBertConfig, None, ["gate_objective=budget", "gate_objective.weight=4e-2"],
                         task="rte")
    assert config.gate_objective["weight"] == pytest.approx(0.04)


def test_runs_under_torchrun_with_two_processes(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    """DDP on CPU (gloo), launched by torch's own torchrun, without code changes."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "recipes.smartbert",
        "--task", "mrpc", "--data-dir", str(glue_dir), "--model", str(tiny_model_dir), "--output-dir", str(out),
        "stage1_epochs=1", "soft_epochs=1", "stage2_epochs=1", "torch_threads=1", *TINY,
    ]
    completed = subprocess.run(command, cwd=tmp_path, env=subprocess_env(checkout_first=True), capture_output=True,
                               text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["sizes"]["train"] == 36 and results["sweep"][0]["exit_layer_histogram"] == [0, 16]
    # Each of the two ranks trains on its half of the 36 training rows.
    assert "18 samples in" in completed.stderr, completed.stderr[-3000:]
