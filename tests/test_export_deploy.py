"""The exported folder as a user deploys it: the eager engine's input errors for every family, the
tokenizer and trained length in the folder, raw text in, ONNX Runtime beside torch, output-folder
checks before any work, the exporters' warnings collected, every mode from one export, MACs."""

from __future__ import annotations

import errno
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch

from adaptive_depth import AdaptiveEncoder, AdaptivePipeline, EntropyExit
from adaptive_depth import export as export_module
from adaptive_depth.engine import AdaptiveInferenceEngine
from adaptive_depth.export import export_engine
from adaptive_depth.export_files import ExportStorageError, check_output_dir
from adaptive_depth.export_runtime import ExportedEngine, onnx_session_options
from adaptive_depth.export_steps import EmbeddingStep
from tests.conftest import ALIASES, FAMILIES, padded_batch, requires_minilm, tiny_minilm_encoder, tiny_model
from tests.test_export import assert_same_run, spread_encoder

pytestmark = pytest.mark.usefixtures("one_thread")

needs_onnx = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(name) is None for name in ("onnx", "onnxruntime", "onnxscript")),
    reason="pip install 'adaptive_depth[export]'",
)


def raised(call) -> str:
    with pytest.raises(ValueError) as error:
        call()
    return str(error.value)


def check_lengths_as_eager(encoder: AdaptiveEncoder, exported: ExportedEngine) -> None:
    """Over-long and left-padded inputs: the eager engine's ValueError, word for word; the longest
    allowed input runs and takes the eager engine's decisions, MACs included."""
    eager = AdaptiveInferenceEngine(encoder, mode=exported.mode)
    limit = encoder.adapter.max_tokens(encoder.config)
    assert exported.max_tokens == limit
    too_long = torch.randint(5, 99, (2, limit + 1))
    message = raised(lambda: eager(too_long))
    assert f"holds {limit}; truncate the inputs" in message
    assert raised(lambda: exported(too_long)) == message
    left_padded = torch.tensor([[0, 1, 1, 1]])
    assert raised(lambda: exported(too_long[:1, :4], left_padded)) == raised(lambda: eager(too_long[:1, :4], left_padded))
    longest, mask = too_long[:, :limit], torch.ones(2, limit, dtype=torch.long)
    mask[1, limit // 2:] = 0
    expected, got = eager(longest, mask), exported(longest, mask)
    assert_same_run(expected, got)
    assert torch.equal(got.macs_exact, expected.macs_exact) and torch.equal(got.full_macs_exact, expected.full_macs_exact)


@pytest.mark.parametrize("model_type", FAMILIES + ALIASES)
def test_exported_engine_refuses_over_long_input_as_the_eager_engine_does(model_type: str, tmp_path: Path) -> None:
    """The bug this guards against: the export copied the position limit (xlm-roberta, camembert and
    mpnet number positions after the padding index) and died with a bare IndexError."""
    encoder = spread_encoder(tiny_model(model_type, num_layers=1), seed=1)
    folder = export_engine(encoder, tmp_path / "exported", "torch-export", mode="full")
    check_lengths_as_eager(encoder, ExportedEngine(folder))


def check_torch_still_runs(encoder: AdaptiveEncoder, exported: ExportedEngine) -> None:
    """ONNX Runtime and torch in one process: after an exported call, torch forwards (the eager
    engine, the plain backbone) still run, on torch's own thread count, with the same results as
    before it. No timing: the CPU is shared."""
    input_ids, attention_mask = padded_batch(batch_size=4, num_tokens=9, seed=3)
    eager = AdaptiveInferenceEngine(encoder, mode="full")
    threads = torch.get_num_threads()

    def torch_forwards():
        with torch.inference_mode():
            return eager(input_ids, attention_mask), encoder.backbone(
                input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    before, plain_before = torch_forwards()
    assert_same_run(before, exported(input_ids, attention_mask))
    after, plain_after = torch_forwards()
    assert torch.get_num_threads() == threads
    assert_same_run(before, after)
    torch.testing.assert_close(plain_after, plain_before, rtol=0, atol=1e-6)


def check_ids_outside_the_tables_are_refused(encoder: AdaptiveEncoder, exported: ExportedEngine) -> None:
    """ONNX Runtime's Gather wraps a negative id to the end of the table and answers where the eager engine
    raises: the exported engine refuses ids outside the tables, naming them."""
    input_ids = torch.randint(5, 99, (2, 6))
    vocab = int(encoder.config.vocab_size)
    for bad in (-1, vocab):
        ids = input_ids.clone()
        ids[1, 3] = bad
        with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {vocab}\).*\[{bad}\]"):
            exported(ids)
    if "token_type_ids" in exported.embedding_inputs:
        types = torch.zeros_like(input_ids)
        types[0, 2] = -1
        with pytest.raises(ValueError, match=r"token_type_ids must lie in \[0, "):
            exported(input_ids, token_type_ids=types)
    exported(input_ids)  # the ids themselves run


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_onnx_exports_ort_cannot_run_are_refused_before_any_work(dtype: torch.dtype, tmp_path: Path) -> None:
    """ONNX Runtime's CPU provider lacks bfloat16 and some float64 kernels: the folder would be written and
    never load."""
    encoder = spread_encoder(tiny_model("bert", num_layers=1), seed=1).to(dtype)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=f"do not run {name} graphs.*format='torch-export'"):
        export_engine(encoder, tmp_path / "exported", "onnx", mode="full")
    assert not (tmp_path / "exported").exists()


@needs_onnx
@pytest.mark.parametrize("model_type", ["bert", "xlm-roberta"])
def test_onnx_engine_refuses_over_long_input_and_leaves_torch_working(model_type: str, tmp_path: Path) -> None:
    encoder = spread_encoder(tiny_model(model_type, num_layers=1), seed=1)
    folder = export_engine(encoder, tmp_path / "exported", "onnx", mode="full")
    exported = ExportedEngine(folder, num_threads=1)
    check_lengths_as_eager(encoder, exported)
    check_torch_still_runs(encoder, exported)
    check_ids_outside_the_tables_are_refused(encoder, exported)
    options = exported.session_options  # pinned to the caller's threads, no spin-waiting
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"



@needs_onnx
def test_onnx_sessions_follow_torchs_thread_count_by_default() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert onnx_session_options().intra_op_num_threads == 2
        assert onnx_session_options(3).intra_op_num_threads == 3
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        onnx_session_options(0)


def test_one_adaptive_export_runs_every_mode_and_a_full_export_refuses_exits(tmp_path: Path) -> None:
    encoder = spread_encoder(tiny_model("bert", num_layers=2), seed=4)
    input_ids, attention_mask = padded_batch(batch_size=6, num_tokens=11, seed=5)
    exported = ExportedEngine(export_engine(encoder, tmp_path / "adaptive", "torch-export", criterion=EntropyExit(0.5)))
    for mode in ("adaptive", "skip_only", "exit_only", "full"):
        view = exported.with_operating_point(mode=mode)
        expected = AdaptiveInferenceEngine(encoder, EntropyExit(0.5), mode=mode)(input_ids, attention_mask)
        got = view(input_ids, attention_mask)
        assert_same_run(expected, got)
        assert torch.equal(got.macs_exact, expected.macs_exact)
        assert view.embeddings is exported.embeddings  # the graphs are shared, not reloaded
    assert exported.mode == "adaptive"
    full = ExportedEngine(export_engine(encoder, tmp_path / "full", "torch-export", mode="full"))
    with pytest.raises(ValueError, match="needs the gates.*mode='adaptive'"):
        full.configure(mode="skip_only")
    with pytest.raises(ValueError, match="needs every exit head"):
        ExportedEngine(tmp_path / "full", mode="exit_only")
    with pytest.raises(ValueError, match="mode must be one of"):
        full.configure(mode="fast")


def test_torch_export_programs_run_without_per_call_guards_and_eval_no_ops(tmp_path: Path) -> None:
    encoder = spread_encoder(tiny_model("bert"), seed=0)
    exported = ExportedEngine(export_engine(encoder, tmp_path / "exported", "torch-export"))
    module = exported.layers[0]
    assert module.validate_inputs is False
    targets = {node.target for node in module.graph.nodes}
    assert torch.ops.aten.dropout.default not in targets and torch.ops.aten._assert_tensor_metadata.default not in targets
    # The embeddings graph holds the embeddings only, not the whole backbone's weights.
    assert all(key.startswith(("embeddings.", "projection.")) for key in EmbeddingStep(encoder.backbone).state_dict())


@requires_minilm
@pytest.mark.parametrize("export_format", ["torch-export", pytest.param("onnx", marks=[needs_onnx, pytest.mark.slow])])
def test_exported_folder_classifies_raw_text_as_the_pipeline_does(export_format: str, tmp_path: Path, capsys) -> None:
    from adaptive_depth import ExportedPipeline  # the one documented call: ExportedPipeline.from_folder(folder)
    from tests.test_pipeline import PAIRS, SENTENCES

    encoder, tokenizer = tiny_minilm_encoder(num_layers=3)
    encoder.adaptive_config.label_names = ["not_equivalent", "equivalent"]
    encoder.adaptive_config.max_length = 12  # trained at 12 tokens: the raw text is cut there
    saved = encoder.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    out_dir = tmp_path / "deploy" / "exported"  # the missing parent is created
    assert export_module.main([str(saved), str(out_dir), "--format", export_format]) == 0
    assert "holds no tokenizer" not in capsys.readouterr().out
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["max_length"] == 12 and manifest["max_tokens"] == 128 and manifest["tokenizer"] is True
    assert manifest["label_names"] == ["not_equivalent", "equivalent"]
    exported = ExportedPipeline.from_folder(out_dir, batch_size=4)
    eager = AdaptivePipeline.from_pretrained(saved, batch_size=4)
    eager.encoder.fuse_for_inference(False)  # the exported graphs run (and count the MACs of) the unfused path
    assert exported.max_length == eager.max_length == 12
    for got, expected in zip(exported(SENTENCES, PAIRS), eager(SENTENCES, PAIRS), strict=True):
        assert (got.label, got.label_id, got.exit_layer, got.layers_run, got.layers_skipped) == (
            expected.label, expected.label_id, expected.exit_layer, expected.layers_run, expected.layers_skipped)
        assert got.relative_cost == pytest.approx(expected.relative_cost, rel=1e-12)
        assert got.probabilities == pytest.approx(expected.probabilities, abs=1e-4)
    assert "ExportedPipeline(bert" in repr(exported)


@requires_minilm
@pytest.mark.parametrize("where", ["hub id", "home"])
def test_the_tokenizer_is_found_where_the_model_is(where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys) -> None:
    """A Hub id or a ``~/`` path: the tokenizer comes from the folder the model was loaded from (not from a
    relative path of that name, which does not exist)."""
    from adaptive_depth import pretrained

    encoder, tokenizer = tiny_minilm_encoder(num_layers=2)
    saved = encoder.save_pretrained(tmp_path / "home" / "model", tokenizer=tokenizer)
    monkeypatch.chdir(tmp_path)
    if where == "hub id":  # the Hub's snapshot is the saved folder (no network in the tests)
        monkeypatch.setattr(pretrained, "download_snapshot", lambda repo_id, revision=None: saved)
        name = "org/tiny-model"
    else:
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        name = "~/model"
    assert export_module.main([name, str(tmp_path / "exported"), "--format", "torch-export", "--mode", "full"]) == 0
    assert "holds no tokenizer" not in capsys.readouterr().out
    assert json.loads((tmp_path / "exported" / "manifest.json").read_text())["tokenizer"] is True


def test_a_folder_without_tokenizer_says_so_and_keeps_the_family_limit(tmp_path: Path, capsys) -> None:
    from adaptive_depth.export_pipeline import ExportedPipeline

    encoder = spread_encoder(tiny_model("roberta"), seed=0)  # no trained length recorded
    saved = encoder.save_pretrained(tmp_path / "model")
    assert export_module.main([str(saved), str(tmp_path / "exported"), "--format", "torch-export"]) == 0
    assert "holds no tokenizer" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "exported" / "manifest.json").read_text())
    assert manifest["max_length"] == manifest["max_tokens"] == 62  # 64 positions after padding index 1
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        ExportedPipeline.from_folder(tmp_path / "exported")


@pytest.mark.filterwarnings("ignore:an exporter's warning")  # let through by --verbose
def test_the_exporters_messages_are_collected_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys) -> None:
    original = export_module._export_one

    def chatty(*args, **kwargs):
        warnings.warn("an exporter's warning", UserWarning)
        logging.getLogger("torch.onnx._internal.exporter").warning("an exporter's log line")
        print("an exporter's print")
        return original(*args, **kwargs)

    monkeypatch.setattr(export_module, "_export_one", chatty)
    saved = spread_encoder(tiny_model("bert"), seed=0).save_pretrained(tmp_path / "model")
    capsys.readouterr()
    assert export_module.main([str(saved), str(tmp_path / "quiet"), "--format", "torch-export", "--mode", "full"]) == 0
    out, err = capsys.readouterr()
    log = (tmp_path / "quiet" / "export.log").read_text().splitlines()
    assert len(log) == 3 * 4  # embeddings, two layers, the last head
    assert {"UserWarning: an exporter's warning", "an exporter's print"} <= set(log)
    assert "WARNING torch.onnx._internal.exporter: an exporter's log line" in log
    assert "an exporter's" not in out + err and "12 export warnings (none needs action)" in out
    assert export_module.main([str(saved), str(tmp_path / "loud"), "--format", "torch-export", "--mode", "full",
                               "--verbose"]) == 0
    assert "an exporter's print" in capsys.readouterr().out
    assert (tmp_path / "loud" / "export.log").read_text() == ""


def test_a_failed_export_shows_the_collected_messages_and_leaves_nothing(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def fail(*args, **kwargs):
        print("what the exporter said first")
        raise RuntimeError("the exporter failed")

    monkeypatch.setattr(export_module, "_export_one", fail)
    with pytest.raises(RuntimeError, match="the exporter failed"):
        export_engine(spread_encoder(tiny_model("bert"), seed=0), tmp_path / "out", "torch-export")
    assert "what the exporter said first" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_output_folder_is_checked_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    saved = spread_encoder(tiny_model("bert"), seed=0).save_pretrained(tmp_path / "model")
    loads = []
    monkeypatch.setattr(AdaptiveEncoder, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a)))
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "taken").mkdir()
    capsys.readouterr()  # the save's progress bar
    cases = {tmp_path / "taken": "already exists; choose a new folder",
             tmp_path / "a_file": "already exists",
             tmp_path / "a_file" / "sub" / "out": "a_file is a file, not a folder"}
    for out_dir, message in cases.items():
        assert export_module.main([str(saved), str(out_dir), "--format", "torch-export"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and err.startswith("error: ") and "Errno" not in err
    # A read-only or full file system: one line, before the model is loaded.
    for code, reason in ((errno.EROFS, "read-only"), (errno.ENOSPC, "the disk is full"), (errno.EACCES, "permission")):
        def refuse(*args, _code=code, **kwargs):
            raise OSError(_code, "refused", str(tmp_path / ".out-check"))

        monkeypatch.setattr("adaptive_depth.export_files.tempfile.mkdtemp", refuse)
        assert export_module.main([str(saved), str(tmp_path / "out"), "--format", "torch-export"]) == 2
        err = capsys.readouterr().err
        assert reason in err and err.count("\n") == 1 and "Traceback" not in err
    assert loads == [] and not (tmp_path / "out").exists()


def test_missing_parents_are_created(tmp_path: Path) -> None:
    target = check_output_dir(tmp_path / "a" / "b" / "exported")
    assert target.parent.is_dir() and not target.exists() and list(target.parent.iterdir()) == []


def _torch_write_failure() -> RuntimeError:
    """What torch.export.save raises when the file object it writes to hits a full disk."""
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as cause:
        try:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 64 vs 0") from cause
        except RuntimeError as error:
            return error


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), _torch_write_failure()])
def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(failure: Exception, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch.export, "save", disk_full)
    with pytest.raises(ExportStorageError, match="cannot write the export to .*out: the disk is full") as error:
        export_engine(spread_encoder(tiny_model("bert"), seed=0), tmp_path / "out", "torch-export")
    assert "\n" not in str(error.value) and "Errno" not in str(error.value) and error.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_under_torch_export_is_one_line_and_the_process_survives(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's own archive writer aborts the process when destroyed after a failed write (try
    ``torch.export.save(program, "/dev/full")``): the archive is built in memory and Python writes it."""
    import gc

    original = Path.write_bytes

    def full_disk(self: Path, data) -> int:
        if self.suffix == ".pt2":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(ExportStorageError, match="the disk is full"):
        export_engine(spread_encoder(tiny_model("bert"), seed=0), tmp_path / "out", "torch-export", mode="full")
    gc.collect()  # where torch's writer would have taken the process down
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_manifest_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"manifest_version": 2, "format": "on')
    with pytest.raises(ValueError, match=r"manifest.json is not valid JSON .*re-export the model"):
        ExportedEngine(folder)
