"""save_pretrained / from_pretrained: identical logits and traces, dtypes, damaged folders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from adaptive_depth import AdaptiveEncoder, AdaptiveEncoderConfig, EntropyExit, ModelFolderError
from adaptive_depth.engine import AdaptiveInferenceEngine
from adaptive_depth.pretrained import ADAPTIVE_CONFIG_NAME, ADAPTIVE_WEIGHTS_NAME
from tests.conftest import FAMILIES, assert_same_model, minilm_dir, padded_batch, random_encoder, requires_minilm

@pytest.mark.parametrize("model_type", FAMILIES)
def test_round_trip_gives_identical_logits_and_traces(model_type: str, tmp_path: Path) -> None:
    encoder = random_encoder(model_type, seed=4, num_layers=3)
    encoder.adaptive_config.threshold = 0.7
    encoder.adaptive_config.label_names = ["a", "b", "c"]
    folder = encoder.save_pretrained(tmp_path / "model")
    loaded = AdaptiveEncoder.from_pretrained(folder)
    assert not loaded.training and loaded.adaptive_config == encoder.adaptive_config
    assert loaded.adaptive_config.label_names == ["a", "b", "c"]
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    input_ids, attention_mask = padded_batch(batch_size=6, num_tokens=11, seed=2)
    trace = AdaptiveInferenceEngine(encoder, EntropyExit(0.7))(input_ids, attention_mask)
    # The gates skip or the heads exit somewhere, so the traces compared below are not all-full-depth.
    assert bool(trace.layers_skipped.any()) or bool((trace.exit_layer < loaded.num_steps).any())
    assert_same_model(encoder, loaded, input_ids, attention_mask, EntropyExit(0.7))
    # The backbone files are plain Hugging Face files.
    from transformers import AutoModel

    assert type(AutoModel.from_pretrained(folder)) is type(encoder.backbone)


@requires_minilm
def test_round_trip_of_the_real_minilm_with_its_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    path = str(minilm_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    encoder = AdaptiveEncoder(AutoModel.from_pretrained(path), num_labels=2).eval()
    for gate in encoder.gates:
        gate.score.bias.data.uniform_(-2.0, 2.0)
    folder = encoder.save_pretrained(tmp_path / "minilm", tokenizer=tokenizer)
    loaded = AdaptiveEncoder.from_pretrained(folder)
    batch = tokenizer(["A man plays a guitar.", "Hi.", "The cat sat on the mat while it rained."],
                      padding=True, return_tensors="pt")
    assert_same_model(encoder, loaded, batch["input_ids"], batch["attention_mask"], EntropyExit(0.5))
    assert AutoTokenizer.from_pretrained(folder)("Hi.")["input_ids"] == tokenizer("Hi.")["input_ids"]


def test_from_pretrained_in_bfloat16_runs_the_engine(tmp_path: Path) -> None:
    encoder = random_encoder("bert", seed=1).float()
    folder = encoder.save_pretrained(tmp_path / "model")
    loaded = AdaptiveEncoder.from_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    trace = AdaptiveInferenceEngine(loaded, EntropyExit(0.5))(*padded_batch())
    assert trace.logits.dtype == torch.bfloat16 and bool(torch.isfinite(trace.logits.float()).all())
    reference = AdaptiveInferenceEngine(encoder, EntropyExit(0.0), mode="full")(*padded_batch())
    full = AdaptiveInferenceEngine(loaded, EntropyExit(0.0), mode="full")(*padded_batch())
    torch.testing.assert_close(full.logits.float(), reference.logits, atol=0.1, rtol=0.05)


def test_saving_over_a_model_replaces_it_and_a_failed_save_leaves_the_old_one(tmp_path: Path, monkeypatch) -> None:
    first = random_encoder("bert", seed=1)
    folder = first.save_pretrained(tmp_path / "model")
    second = random_encoder("bert", seed=2)

    import safetensors.torch

    def failing_save_file(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space"):
        second.save_pretrained(folder)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging folder left behind
    assert_same_model(first, AdaptiveEncoder.from_pretrained(folder), *padded_batch(), EntropyExit(0.5))
    second.save_pretrained(folder)
    assert_same_model(second, AdaptiveEncoder.from_pretrained(folder), *padded_batch(), EntropyExit(0.5))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        second.save_pretrained(folder, overwrite=False)


def test_a_save_killed_mid_swap_does_not_block_a_later_one_with_the_same_pid(tmp_path: Path) -> None:
    """The old folder is moved aside under a name no other save uses: what a killed save left there (PIDs
    repeat, e.g. in containers) neither blocks the swap nor is touched by it."""
    import os

    first = random_encoder("bert", seed=1)
    folder = first.save_pretrained(tmp_path / "model")
    leftover = tmp_path / f".model.old-{os.getpid()}"
    (leftover / "model.safetensors").parent.mkdir()
    (leftover / "model.safetensors").write_text("what a killed save moved aside")
    second = random_encoder("bert", seed=2)
    second.save_pretrained(folder)
    assert_same_model(second, AdaptiveEncoder.from_pretrained(folder), *padded_batch(), EntropyExit(0.5))
    assert sorted(p.name for p in tmp_path.iterdir()) == [leftover.name, "model"]


def test_a_model_a_killed_save_moved_aside_is_named_where_the_folder_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save killed between moving the old model aside and moving the new one in leaves no folder: loading
    it says where the old model is and how to put it back, also for a name that looks like a Hub id."""
    import shlex

    encoder = random_encoder("bert", seed=1)
    folder = encoder.save_pretrained(tmp_path / "runs" / "model")
    retired = folder.parent / ".model.old-4242-0badcafe"
    folder.rename(retired)
    (folder.parent / ".model.old-4243-halfgone").mkdir()  # a half-removed one: not a model, not named
    monkeypatch.chdir(tmp_path)
    for name in (str(folder), "runs/model"):
        with pytest.raises(FileNotFoundError, match="a save into it was interrupted") as caught:
            AdaptiveEncoder.from_pretrained(name)
        assert ".model.old-4242-0badcafe" in str(caught.value) and "halfgone" not in str(caught.value)
        command = str(caught.value).split("To get it back: ")[1]
        assert [Path(part).resolve() for part in shlex.split(command)[1:]] == [retired, folder]
    retired.rename(folder)
    assert_same_model(encoder, AdaptiveEncoder.from_pretrained(folder), *padded_batch(), EntropyExit(0.5))


def test_saving_over_a_folder_without_its_tokenizer_warns(tmp_path: Path) -> None:
    """The save replaces the whole folder, so a model saved over one with a tokenizer, without one, loses
    it (and AdaptivePipeline can no longer load the folder): said as a warning; passing one keeps quiet."""
    import warnings

    class Vocab:  # the tokenizer interface save_pretrained uses
        def save_pretrained(self, folder: Path) -> None:
            (Path(folder) / "vocab.txt").write_text("[PAD]\n[UNK]\n")

    encoder = random_encoder("bert", seed=1)
    folder = encoder.save_pretrained(tmp_path / "model", tokenizer=Vocab())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.save_pretrained(folder, tokenizer=Vocab())
    assert (folder / "vocab.txt").is_file()
    with pytest.warns(UserWarning, match=r"holds a tokenizer.*pass tokenizer=") as caught:
        encoder.save_pretrained(folder)
    assert caught[0].filename == __file__  # points at the caller's line
    assert not (folder / "vocab.txt").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.save_pretrained(folder)  # nothing left to lose


UNUSABLE_ATTENTION = [pytest.param("flash_attention_2", marks=pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")), "no_such_attention"]


@pytest.mark.parametrize("implementation", UNUSABLE_ATTENTION)
def test_an_attention_that_cannot_be_used_here(implementation: str, tmp_path: Path) -> None:
    """Asked for: a ValueError naming the argument. Saved with the model (flash_attention_2 where it was
    trained, say): a warning that says so, and the same model loaded with transformers' default."""
    import warnings

    from adaptive_depth.model_folder import write_manifest

    encoder = random_encoder("bert", seed=1)
    folder = encoder.save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=f"attn_implementation='{implementation}' cannot be used here: .+"):
        AdaptiveEncoder.from_pretrained(folder, attn_implementation=implementation)
    saved = json.loads((folder / ADAPTIVE_CONFIG_NAME).read_text())
    (folder / ADAPTIVE_CONFIG_NAME).write_text(json.dumps(saved | {"attn_implementation": implementation}))
    write_manifest(folder)
    with pytest.warns(UserWarning, match=f"saved with attn_implementation='{implementation}', which cannot be used "
                                         "here .+transformers' default") as caught:
        loaded = AdaptiveEncoder.from_pretrained(folder)
    assert caught[0].filename == __file__
    assert loaded.config._attn_implementation != implementation
    assert_same_model(encoder, loaded, *padded_batch(), EntropyExit(0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdaptiveEncoder.from_pretrained(folder, attn_implementation="eager")  # a choice that works: quiet


def test_a_folder_saved_in_format_1_loads(tmp_path: Path) -> None:
    """Format 1 (adaptive_depth before 2026-11-30): adaptive_config.json without the fields added since and
    no manifest, as that version wrote it (checked against a save by commit 79d6bd8^). It loads, with the
    criterion's default options, and is the same model; saving it again writes format 2."""
    from adaptive_depth.model_folder import MANIFEST_NAME

    encoder = random_encoder("bert", seed=3)
    encoder.adaptive_config.threshold = 0.4
    folder = encoder.save_pretrained(tmp_path / "model")
    saved = json.loads((folder / ADAPTIVE_CONFIG_NAME).read_text())
    since = ("certificate", "criterion_options", "last_head", "metric", "text_pair")
    format_1 = {key: value for key, value in saved.items() if key not in since} | {"format_version": 1}
    (folder / ADAPTIVE_CONFIG_NAME).write_text(json.dumps(format_1))
    (folder / MANIFEST_NAME).unlink()
    with pytest.warns(UserWarning, match="no adaptive_manifest.json"):
        loaded = AdaptiveEncoder.from_pretrained(folder)
    assert loaded.adaptive_config.threshold == 0.4 and loaded.adaptive_config.criterion_options == {}
    assert_same_model(encoder, loaded, *padded_batch(), EntropyExit(0.4))
    again = loaded.save_pretrained(tmp_path / "again")
    assert json.loads((again / ADAPTIVE_CONFIG_NAME).read_text())["format_version"] == 2


def test_refuses_to_save_over_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a saved adaptive model"):
        random_encoder("bert", seed=1).save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_damaged_or_foreign_folders_give_clear_errors(tmp_path: Path) -> None:
    from tests.conftest import tiny_model

    plain = tmp_path / "plain"
    tiny_model("bert").save_pretrained(plain)
    with pytest.raises(FileNotFoundError, match="plain Hugging Face model"):
        AdaptiveEncoder.from_pretrained(plain)
    with pytest.raises(FileNotFoundError, match="missing/model does not exist"):
        AdaptiveEncoder.from_pretrained(tmp_path / "missing" / "model")
    folder = random_encoder("bert", seed=1).save_pretrained(tmp_path / "model")
    original = (folder / ADAPTIVE_CONFIG_NAME).read_text()
    config = json.loads(original)
    (folder / ADAPTIVE_CONFIG_NAME).write_text(json.dumps({**config, "gate_sise": 3}))
    with pytest.raises(ModelFolderError, match="adaptive_config.json differs"):
        AdaptiveEncoder.from_pretrained(folder)
    with pytest.raises(ModelFolderError, match="unknown keys.*gate_sise"):
        AdaptiveEncoder.from_pretrained(folder, verify=False)
    (folder / ADAPTIVE_CONFIG_NAME).write_text(json.dumps({**config, "head_inner_size": 8}))
    with pytest.raises(ModelFolderError, match="exit_heads.0.*has shape"):
        AdaptiveEncoder.from_pretrained(folder, verify=False)
    (folder / ADAPTIVE_CONFIG_NAME).write_text(original)
    AdaptiveEncoder.from_pretrained(folder)  # the original bytes again: the manifest agrees
    (folder / ADAPTIVE_WEIGHTS_NAME).unlink()
    with pytest.raises(ModelFolderError, match="adaptive_heads.safetensors is missing"):
        AdaptiveEncoder.from_pretrained(folder)


def test_config_validates_its_operating_point() -> None:
    with pytest.raises(ValueError, match="label_names has 1 names"):
        AdaptiveEncoderConfig(num_labels=2, label_names=["x"])
    with pytest.raises(ValueError, match="needs skip gates"):
        AdaptiveEncoderConfig(num_labels=2, with_gates=False, mode="adaptive")
    with pytest.raises(ValueError, match="unknown exit criterion"):
        AdaptiveEncoderConfig(num_labels=2, criterion="confidence")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="whole number"):
        AdaptiveEncoderConfig(num_labels=2, criterion="patience", threshold=1.5)
    assert AdaptiveEncoderConfig(num_labels=1).problem_type == "regression"
    assert AdaptiveEncoderConfig(num_labels=2, with_gates=False).mode == "exit_only"


def test_a_saved_folder_gets_plain_mkdir_permissions_and_home_paths_are_expanded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tempfile.mkdtemp makes the staging folder 0700, which the renamed model folder kept (other users and
    serving containers could not read it); ``~/models/m`` was saved as ``./~/models/m``."""
    import os

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    previous = os.umask(0o022)
    try:
        folder = random_encoder("bert", seed=1).save_pretrained("~/models/m")
    finally:
        os.umask(previous)
    assert folder == tmp_path / "home" / "models" / "m" and not (tmp_path / "~").exists()
    assert folder.stat().st_mode & 0o777 == 0o755
    AdaptiveEncoder.from_pretrained("~/models/m")


@pytest.mark.parametrize("name", ["gate_inner_size", "gate_num_heads", "head_inner_size", "head_num_heads"])
def test_sizes_in_a_hand_edited_config_must_be_positive(name: str) -> None:
    """0 heads used to end in a ZeroDivisionError, a negative size in a torch error, when the modules were built."""
    with pytest.raises(ValueError, match=rf"{name} must be an int >= 1, got 0"):
        AdaptiveEncoderConfig(num_labels=2, **{name: 0})
