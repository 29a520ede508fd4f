"""Runs that lose nothing and resume to the same result; every failure a one-line error.

The SmartBERT CLI runs in-process on a synthetic MRPC folder and a 2-layer, hidden-32 BERT
(seconds per run). Interruptions are real signals sent to this process from inside the loop.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from recipes import smartbert
from recipes.run import checkpoints as ckpt
from recipes.run import files, loop, sweep
from recipes.run.errors import RunFolderError
from recipes.run.folder import LOCK_FILE, RunLock
from tests.conftest import RECIPE_RUN_MARKS, approx_tree, assert_same_weights
from tests.conftest import TINY_SMARTBERT as TINY
from tests.conftest import run_smartbert as run_cli

pytestmark = RECIPE_RUN_MARKS

SCHEDULE = ["stage1_epochs=2", "soft_epochs=1", "stage2_epochs=2", "entropy_thresholds=[0.3]"]
TIMINGS = ("started", "finished", "wall_time_s", "command", "seconds", "samples_per_second", "ms_per_sample", "threads")


def base(glue_dir: Path, model: Path, out: Path) -> list[str]:
    return ["--task", "mrpc", "--data-dir", str(glue_dir), "--model", str(model), "--output-dir", str(out), *TINY]


def without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: without_timings(item) for key, item in value.items() if key not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(item) for item in value]
    return value


def assert_one_error_line(err: str, *fragments: str) -> str:
    """Exactly one ``error: ...`` line, no traceback; returns the line."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted run: its results (timings aside) and final weights."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run_cli(*base(glue_dir, tiny_model_dir, out), *SCHEDULE) == 0
    weights, _, _ = ckpt.load_checkpoint(out / "checkpoint")
    return {"results": without_timings(json.loads((out / "results.json").read_text())), "weights": weights,
            "best": files.load_weights(out / "stage1_best.safetensors")}


def interrupt_epoch(monkeypatch: pytest.MonkeyPatch, epoch_call: int, signal_number: int) -> None:
    """Send ``signal_number`` to this process in the second batch of the ``epoch_call``-th epoch."""
    original = loop.run_epoch
    calls = {"epochs": 0}

    def run_epoch(loader: Any, step: Any, *args: Any, **kwargs: Any) -> Any:
        calls["epochs"] += 1
        if calls["epochs"] != epoch_call:
            return original(loader, step, *args, **kwargs)
        batches = {"count": 0}

        def interrupted_step(batch: Any) -> Any:
            batches["count"] += 1
            if batches["count"] == 2:
                os.kill(os.getpid(), signal_number)
            return step(batch)

        return original(loader, interrupted_step, *args, **kwargs)

    monkeypatch.setattr(loop, "run_epoch", run_epoch)


def test_a_gate_warmup_epoch_is_never_the_best_stage1_epoch(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The warm-up epoch scores best on held-out here, but its gates are untrained (they would skip
    nothing): the best stage-1 weights must come from the epoch that trained the gates."""
    from recipes.run.composer import Run

    scores = iter([0.9, 0.6])
    original = Run.evaluate_heldout

    def evaluate_heldout(self: Run) -> dict[str, float]:
        measured = original(self)
        return {**measured, "f1": next(scores)}

    monkeypatch.setattr(Run, "evaluate_heldout", evaluate_heldout)
    out = tmp_path / "run"
    argv = [*base(glue_dir, tiny_model_dir, out), "stage1_epochs=2", "gate_warmup_epochs=1", "soft_epochs=1",
            "stage2_epochs=0", "entropy_thresholds=[0.3]"]
    assert run_cli(*argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert [epoch["options"]["gate_mode"] for epoch in results["history"]["stage1"]] == ["run", "soft"]
    assert results["best_stage1"] == {"epoch": 1, "metric": "f1", "value": 0.6}


@pytest.mark.parametrize(("where", "signal_number", "checkpoint"), [
    ("stage1", signal.SIGINT, (1, 0)), ("stage2", signal.SIGTERM, (2, 0)), ("sweep", signal.SIGINT, (2, 1)),
])
def test_interrupted_run_resumes_to_the_same_results_and_weights(
    where: str, signal_number: int, checkpoint: tuple[int, int], reference: dict[str, Any], tiny_model_dir: Path,
    glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    argv = [*base(glue_dir, tiny_model_dir, out), *SCHEDULE]
    with monkeypatch.context() as patch:
        if where == "sweep":
            original = sweep.run_sweep

            def run_sweep(*args: Any, **kwargs: Any) -> Any:
                os.kill(os.getpid(), signal_number)
                return original(*args, **kwargs)

            patch.setattr(sweep, "run_sweep", run_sweep)
        else:
            interrupt_epoch(patch, 2 if where == "stage1" else 4, signal_number)
        assert run_cli(*argv) == 128 + signal_number
    err = capsys.readouterr().err
    name = signal.Signals(signal_number).name
    assert f"interrupted ({name}); resume with: python -m recipes.smartbert " in err
    assert err.rstrip().endswith(f"--resume (last checkpoint: stage {checkpoint[0]}, epoch {checkpoint[1] + 1})")
    assert "Traceback" not in err and not (out / LOCK_FILE).exists() and not (out / "results.json").exists()
    _, state, _ = ckpt.load_checkpoint(out / "checkpoint")
    assert (state["stage"], state["epoch"]) == checkpoint

    assert run_cli(*argv, "--resume") == 0
    results = without_timings(json.loads((out / "results.json").read_text()))
    # Two separate runs of the same computation: equal up to float rounding.
    assert results == approx_tree(reference["results"])
    final, _, _ = ckpt.load_checkpoint(out / "checkpoint")
    assert_same_weights(final, reference["weights"])
    assert_same_weights(files.load_weights(out / "stage1_best.safetensors"), reference["best"])


def test_interrupt_before_the_first_checkpoint_says_to_start_again(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    interrupt_epoch(monkeypatch, 1, signal.SIGINT)
    assert run_cli(*base(glue_dir, tiny_model_dir, out), "stage1_epochs=1", "stage2_epochs=0") == 130
    err = capsys.readouterr().err
    assert "holds no checkpoint; start again with: python -m recipes.smartbert" in err
    assert err.rstrip().endswith("--overwrite")


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The optimizer file is written after the weights; the disk fills up there on the second save."""
    out = tmp_path / "run"
    saves = {"count": 0}
    original_save = torch.save

    def save(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        saves["count"] += 1
        if saves["count"] == 2:
            assert (Path(path.name).parent / ckpt.WEIGHTS_FILE).is_file()  # midway (path: the file object written)
            raise OSError(errno.ENOSPC, "No space left on device", path.name)
        original_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save)
    argv = [*base(glue_dir, tiny_model_dir, out), "stage1_epochs=2", "soft_epochs=1", "stage2_epochs=0",
            "entropy_thresholds=[0.3]"]
    assert run_cli(*argv) == 2
    assert_one_error_line(capsys.readouterr().err, "saving the checkpoint", "disk is full")
    _, state, _ = ckpt.load_checkpoint(out / "checkpoint", fallback=False)
    assert (state["stage"], state["epoch"]) == (1, 0)
    assert sorted(path.name for path in out.iterdir() if path.name.startswith(".")) == []  # no temp folder left
    monkeypatch.setattr(ckpt.torch, "save", original_save)
    assert run_cli(*argv, "--resume") == 0


def test_load_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "checkpoint"
    for epoch in range(2):
        weights = {"w": torch.full((3,), float(epoch))}
        ckpt.save_checkpoint(folder, weights, None, {"epoch": epoch}, extra_files={"best.safetensors": weights})
    assert json.loads((ckpt.previous_checkpoint(folder) / "state.json").read_text())["epoch"] == 0
    # Damaged newest checkpoint: the previous one is read, with a warning.
    (folder / "best.safetensors").write_bytes(b"damaged")
    weights, state, _ = ckpt.load_checkpoint(folder)
    assert state["epoch"] == 0 and torch.equal(weights["w"], torch.zeros(3))
    assert "checksum differs" in caplog.text and "using the previous checkpoint" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match="checksum differs"):
        ckpt.load_checkpoint(folder, fallback=False)
    # A crash between the two renames: no newest folder, only the previous one.
    shutil.rmtree(folder)
    assert ckpt.load_checkpoint(folder)[1]["epoch"] == 0


def test_a_used_folder_is_refused_unless_resume_or_overwrite(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = [*base(glue_dir, tiny_model_dir, out), "stage1_epochs=1", "stage2_epochs=0", "entropy_thresholds=[0.3]"]
    assert run_cli(*argv) == 0
    before = {path.name: path.stat().st_mtime_ns for path in out.rglob("*")}
    capsys.readouterr()
    assert run_cli(*argv) == 2
    assert_one_error_line(capsys.readouterr().err, "already holds a run", "--resume", "--overwrite")
    assert {path.name: path.stat().st_mtime_ns for path in out.rglob("*")} == before
    assert run_cli(*argv, "--resume", "--overwrite") == 2
    assert_one_error_line(capsys.readouterr().err, "exclude each other")
    (out / "notes.txt").write_text("mine")
    # Written from the old run (recipes.heldout: its held-out rows, which the new seed may train on) and
    # left by interrupted writes: removed with it.
    leftovers = ["heldout.jsonl", ".model.tmp-123-abcd", ".model.old-77-0123", ".run.json.tmp-9-ffff"]
    (out / "heldout.jsonl").write_text('{"sentence": "held out by seed 42"}\n')
    for name in leftovers[1:3]:
        (out / name).mkdir()
        (out / name / "config.json").write_text("{}")
    (out / leftovers[3]).write_text("{")
    assert run_cli(*argv, "--overwrite", "seed=3") == 0
    assert json.loads((out / "results.json").read_text())["config"]["seed"] == 3
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only the run's own files
    assert not any((out / name).exists() for name in leftovers)


def test_a_folder_locked_by_a_running_process_is_refused(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=tmp_path)
    try:
        (out / LOCK_FILE).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "since": "now"}))
        assert run_cli(*base(glue_dir, tiny_model_dir, out), "stage1_epochs=1") == 2
        assert_one_error_line(capsys.readouterr().err, "in use by another run", f"process {other.pid}")
        with pytest.raises(RunFolderError, match="in use"):
            RunLock(out).acquire()
    finally:
        other.kill()
        other.wait()
    # Its process is gone: the lock is stale and taken over.
    with RunLock(out) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (out / LOCK_FILE).exists()


def test_resume_refuses_another_config_or_other_data(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = [*base(glue_dir, tiny_model_dir, out), "stage1_epochs=1", "stage2_epochs=0", "entropy_thresholds=[0.3]"]
    assert run_cli(*argv) == 0
    capsys.readouterr()
    assert run_cli(*argv, "--resume", "stage1_lr=1e-3") == 2
    assert_one_error_line(capsys.readouterr().err, "another config", "stage1_lr: 5e-05 -> 0.001")  # 5e-5: smartbert_mrpc.yaml
    other = tmp_path / "other-glue"  # the same number of rows, one of them changed
    shutil.copytree(glue_dir, other)
    train = other / "MRPC" / "train.tsv"
    lines = train.read_text(encoding="utf-8-sig").splitlines()
    lines[1] = lines[1] + " x"
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert run_cli(*[str(other) if arg == str(glue_dir) else arg for arg in argv], "--resume") == 2
    assert_one_error_line(capsys.readouterr().err, "other data", "--data-dir")
    # Allowed: stage 2 epochs before stage 2 started, another evaluation batch size.
    assert run_cli(*argv, "--resume", "stage2_epochs=1", "eval_batch_size=4") == 0


def test_silently_wrong_inputs_are_errors(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def refused(model: Path, *overrides: str, fragments: tuple[str, ...]) -> None:
        out = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
        assert run_cli(*base(glue_dir, model, out), "stage1_epochs=1", *overrides) == 2
        assert_one_error_line(capsys.readouterr().err, *fragments)
        assert not out.exists()  # refused before the folder was created

    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, no_tokenizer / name)
    refused(no_tokenizer, fragments=("no tokenizer files",))

    from transformers import BertConfig, BertModel, BertTokenizer

    small_vocab = tmp_path / "small-vocab"
    BertModel(BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37)).save_pretrained(small_vocab)
    shutil.copy(tiny_model_dir / "tokenizer.json", small_vocab)
    shutil.copy(tiny_model_dir / "tokenizer_config.json", small_vocab)
    refused(small_vocab, fragments=("30522 tokens but the model's vocabulary has 1000",))

    few_words = tmp_path / "few-words"
    shutil.copytree(tiny_model_dir, few_words)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (few_words / name).unlink()
    (few_words / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "."]))
    BertTokenizer(str(few_words / "vocab.txt")).save_pretrained(few_words)
    refused(few_words, fragments=("are the unknown token",))

    refused(tiny_model_dir, "max_length=200", "padded_length=200", fragments=("position table", "128 positions"))
    refused(tiny_model_dir, "task=rte", fragments=("--task mrpc but the config asks for task 'rte'",))
    refused(tiny_model_dir, "max_train_rows=1", fragments=("1 training row(s)", "raise max_train_rows"))


def test_resume_refuses_a_missing_or_damaged_best_stage1_file(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = [*base(glue_dir, tiny_model_dir, out), "stage1_epochs=1", "stage2_epochs=0", "entropy_thresholds=[0.3]"]
    assert run_cli(*argv) == 0
    capsys.readouterr()
    best = out / "checkpoint" / "stage1_best.safetensors"
    data = bytearray(best.read_bytes())
    best.unlink()
    assert run_cli(*argv, "--resume", "stage2_epochs=1") == 2
    assert_one_error_line(capsys.readouterr().err, "lacks stage1_best.safetensors")
    data[len(data) // 2] ^= 0x10
    best.write_bytes(bytes(data))
    assert run_cli(*argv, "--resume", "stage2_epochs=1") == 2
    assert_one_error_line(capsys.readouterr().err, "stage1_best.safetensors", "checksum differs")


def test_failures_that_were_tracebacks_are_one_line_errors(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from safetensors.torch import load_file, save_file

    nan_model = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir, nan_model)
    weights = load_file(str(nan_model / "model.safetensors"))
    key = next(name for name in weights if "word_embeddings" in name)
    weights[key][:] = float("nan")
    save_file(weights, str(nan_model / "model.safetensors"))
    assert run_cli(*base(glue_dir, nan_model, tmp_path / "nan"), "stage1_epochs=1", "stage1_lr=2e-5") == 2
    assert_one_error_line(capsys.readouterr().err, "the loss is nan at batch 1", "training diverged",
                          "lower stage1_lr (now 2e-05), e.g. stage1_lr=5e-06")

    original = loop.run_epoch

    def poisoning_epoch(*args: Any, **kwargs: Any) -> Any:
        stats = original(*args, **kwargs)
        with torch.no_grad():
            args[3][0].fill_(float("inf"))  # the trained parameters
        return stats

    with monkeypatch.context() as patch:
        patch.setattr(loop, "run_epoch", poisoning_epoch)
        assert run_cli(*base(glue_dir, tiny_model_dir, tmp_path / "inf"), "stage1_epochs=1") == 2
    assert_one_error_line(capsys.readouterr().err, "after stage 1 epoch 1, 1 of", "NaN or infinity", "stage1_lr")

    corrupt = tmp_path / "corrupt-model"
    shutil.copytree(tiny_model_dir, corrupt)
    raw = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    assert run_cli(*base(glue_dir, corrupt, tmp_path / "c"), "stage1_epochs=1") == 2
    assert_one_error_line(capsys.readouterr().err, "corrupt or truncated")

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert run_cli(*base(glue_dir, tiny_model_dir, a_file / "run")) == 2
    assert_one_error_line(capsys.readouterr().err, "is a file, not a folder")

    monkeypatch.setattr("recipes.run.folder.os.access", lambda path, mode: False)
    assert run_cli(*base(glue_dir, tiny_model_dir, tmp_path / "ro" / "run")) == 2
    assert_one_error_line(capsys.readouterr().err, "cannot write into", "writable --output-dir")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_a_one_line_error(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        assert run_cli(*base(glue_dir, tiny_model_dir, parent / "run")) == 2
        assert_one_error_line(capsys.readouterr().err, "cannot write into")
    finally:
        parent.chmod(0o700)


def test_tradeoff_does_not_reuse_a_run_made_on_other_data(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import tradeoff

    out = tmp_path / "tradeoff"
    argv = ["--task", "mrpc", "--data-dir", str(glue_dir), "--model", str(tiny_model_dir), "--methods", "finetune",
            "--output-dir", str(out), "stage1_epochs=1", "head_inner_size=16", "eval_batch_size=8", "batch_size=8"]
    assert tradeoff.main(argv) == 0
    other = tmp_path / "other-glue"
    shutil.copytree(glue_dir, other)
    train = other / "MRPC" / "train.tsv"
    lines = train.read_text(encoding="utf-8-sig").splitlines()
    lines[2] = lines[2] + " again"
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert tradeoff.main([str(other) if arg == str(glue_dir) else arg for arg in argv]) == 2
    assert_one_error_line(capsys.readouterr().err, "other data")
    # Threads and the evaluation batch size do not change a finished run: it is reused.
    assert tradeoff.main([*argv, "torch_threads=1", "eval_batch_size=4"]) == 0
    assert "reusing" in capsys.readouterr().err


def test_record_run_swaps_the_backbone_folder_in_whole(tmp_path: Path) -> None:
    """The backbone's config and tokenizer are written beside the folder and swapped in: a write that fails
    part-way (a full disk here) leaves the previous backbone/ as it was and no temporary folder."""
    from recipes.run.errors import StorageError
    from recipes.run.folder import BACKBONE_DIR, record_run

    class Config:
        def save_pretrained(self, folder: Path) -> None:
            (Path(folder) / "config.json").write_text('{"new": true}')

    class FullDisk:
        def save_pretrained(self, folder: Path) -> None:
            (Path(folder) / "vocab.txt").write_text("[PA")
            raise OSError(errno.ENOSPC, "No space left on device")

    class Tokenizer:
        def save_pretrained(self, folder: Path) -> None:
            (Path(folder) / "vocab.txt").write_text("[PAD]\n")

    record_run(tmp_path, {"recipe": "smartbert"}, Config(), Tokenizer())
    before = {path.name: path.read_text() for path in (tmp_path / BACKBONE_DIR).iterdir()}
    assert before == {"config.json": '{"new": true}', "vocab.txt": "[PAD]\n"}
    with pytest.raises(StorageError, match="No space left on device"):
        record_run(tmp_path, {"recipe": "smartbert", "again": True}, Config(), FullDisk())
    assert {path.name: path.read_text() for path in (tmp_path / BACKBONE_DIR).iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == [BACKBONE_DIR, "run.json"]
    assert json.loads((tmp_path / "run.json").read_text()) == {"recipe": "smartbert"}
