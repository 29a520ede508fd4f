"""Export the adaptive engine as static-shape pieces plus a small driver.

``torch.jit.trace``, ``torch.export`` and ``torch.onnx.export`` cannot take the engine as a
whole: which rows run which layer depends on the data. So each *step* is exported on its own,
as a graph over a batch of active rows whose only dynamic dimensions are the row count ``R``
and the sequence length ``N``:

- ``embeddings``: ``(input_ids [R, N], token_type_ids [R, N]) -> hidden [R, N, H]`` (what enters
  the first layer: embeddings, then ELECTRA's ``embeddings_project`` or ALBERT's
  ``embedding_hidden_mapping_in``; DistilBERT takes no ``token_type_ids``);
- ``layer_k``: ``(hidden [R, N, H], attention_mask [R, N]) -> hidden [R, N, H]``; the layer-level
  mask is built inside from the ``[R, N]`` mask as transformers builds it for the model's
  attention implementation (bool ``[R, 1, N, N]`` for sdpa, additive float for eager);
- ``gate_i``: ``(hidden, attention_mask) -> p_skip [R]``; ``head_i``: ``(hidden, attention_mask) -> logits [R, C]``.

The per-sample skip/exit loop lives in :mod:`adaptive_depth.export_runtime`, which runs these
graphs with ``torch.export`` programs or ONNX Runtime and gives the same decisions as
:class:`adaptive_depth.engine.AdaptiveInferenceEngine`. A ``manifest.json`` records the files and
the operating point (mode, gate threshold, exit criterion).

    python -m adaptive_depth.export MODEL_DIR --format onnx OUT_DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from adaptive_depth.backbones import UnsupportedModelError
from adaptive_depth.config import CriterionName, check_gate_threshold, criterion_from_name, criterion_with_threshold
from adaptive_depth.encoder import AdaptiveEncoder
from adaptive_depth.exits import EntropyExit, ExitCriterion, MaxProbExit, PatienceExit, ToleranceExit
from adaptive_depth.export_steps import EXPORT_EMBEDDINGS, EmbeddingStep, GateStep, HeadStep, LayerStep

__all__ = [
    "EXPORT_FORMATS",
    "CRITERIA",
    "EmbeddingStep",
    "ExportFormat",
    "GateStep",
    "HeadStep",
    "LayerStep",
    "criterion_from_dict",
    "criterion_to_dict",
    "export_engine",
]

ExportFormat = Literal["onnx", "torch-export"]
EXPORT_FORMATS: dict[str, str] = {"onnx": ".onnx", "torch-export": ".pt2"}
MANIFEST_VERSION = 1
CRITERIA: dict[str, type] = {"EntropyExit": EntropyExit, "MaxProbExit": MaxProbExit, "PatienceExit": PatienceExit,
                             "ToleranceExit": ToleranceExit}


def criterion_to_dict(criterion: ExitCriterion) -> dict[str, Any]:
    """``{"type": "EntropyExit", "threshold": 0.3, ...}`` for a built-in criterion.

    Raises:
        ValueError: for a criterion class the exported driver cannot rebuild.
    """
    name = type(criterion).__name__
    if name not in CRITERIA or not dataclasses.is_dataclass(criterion):
        raise ValueError(
            f"cannot export the exit criterion {name}; the exported driver knows {', '.join(sorted(CRITERIA))}."
        )
    return {"type": name, **dataclasses.asdict(criterion)}


def criterion_from_dict(spec: dict[str, Any]) -> ExitCriterion:
    """Inverse of :func:`criterion_to_dict`."""
    spec = dict(spec)
    name = spec.pop("type", None)
    if name not in CRITERIA:
        raise ValueError(f"unknown exit criterion {name!r} in the manifest; known: {', '.join(sorted(CRITERIA))}.")
    return CRITERIA[name](**spec)


def _max_length(config: Any) -> int:
    """The longest sequence the position embeddings allow (RoBERTa's positions start after padding_idx)."""
    length = int(getattr(config, "max_position_embeddings", 512))
    if config.model_type == "roberta":
        length -= int(config.pad_token_id) + 1
    return length


def _export_one(
    module: nn.Module,
    example: dict[str, Tensor],
    output_name: str,
    path: Path,
    export_format: str,
    max_length: int,
    opset: int | None,
) -> None:
    """Export ``module`` called with keyword tensors ``example``; dims 0 (rows) and 1 (tokens) are dynamic."""
    rows = torch.export.Dim("rows", min=1, max=1 << 20)
    tokens = torch.export.Dim("tokens", min=1, max=max_length)
    dynamic = {name: {0: rows, 1: tokens} for name in example}
    if export_format == "torch-export":
        program = torch.export.export(module, (), kwargs=example, dynamic_shapes=dynamic, strict=False)
        torch.export.save(program, path)
        return
    torch.onnx.export(
        module, (), str(path), kwargs=example, dynamo=True, dynamic_shapes=dynamic,
        input_names=list(example), output_names=[output_name], opset_version=opset, external_data=False,
        verbose=False,
    )


def export_engine(
    encoder: AdaptiveEncoder,
    out_dir: str | Path,
    format: ExportFormat = "onnx",  # noqa: A002 - the CLI's word for it
    *,
    criterion: ExitCriterion | None = None,
    gate_threshold: float | None = None,
    mode: str = "adaptive",
    opset: int | None = None,
    example_length: int = 8,
) -> Path:
    """Export ``encoder``'s embeddings, layers, gates and heads as static-shape graphs in ``out_dir``.

    The folder holds one file per step (``embeddings``, ``layer_<k>`` per distinct layer module,
    ``gate_<i>``, ``head_<i>``; ``.onnx`` or ``.pt2``) and ``manifest.json`` with the operating point.
    Run it with :class:`adaptive_depth.export_runtime.ExportedEngine`. The folder is written under a
    temporary name and renamed at the end, so a failed export leaves nothing behind.

    Args:
        encoder: the wrapped model, in the dtype and on the device to export from (moved to eval mode).
        out_dir: a folder that does not exist yet.
        format: ``"onnx"`` (needs ``pip install adaptive_depth[export]``) or ``"torch-export"``.
        criterion: exit criterion of the operating point (entropy ``S = 0.3`` by default, as the engine).
        gate_threshold: skip when ``p_skip >= gate_threshold`` (1.0 never skips); ``None``: the
            encoder's own (``encoder.adaptive_config.gate_threshold``).
        mode: ``"adaptive"``, ``"skip_only"``, ``"exit_only"`` or ``"full"`` (see the engine).
        opset: ONNX opset (``None``: torch.onnx's default).
        example_length: sequence length of the example inputs traced (the exported graphs accept
            1 to ``max_position_embeddings`` tokens and any row count).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: unknown ``format`` or ``mode``, a gated mode on an encoder without gates, an
            attention implementation other than sdpa/eager, an unknown criterion class.
        FileExistsError: ``out_dir`` exists.
        UnsupportedModelError: a model family the exporter does not know.
        ModuleNotFoundError: ``format="onnx"`` without onnx / onnxscript installed.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
        ...                             num_attention_heads=4, intermediate_size=37))
        >>> encoder = AdaptiveEncoder(bert, num_labels=2, gate_inner_size=16, head_inner_size=16)
        >>> import tempfile; folder = Path(tempfile.mkdtemp()) / "exported"
        >>> sorted(p.name for p in export_engine(encoder, folder, "torch-export").iterdir())[:3]
        ['embeddings.pt2', 'gate_0.pt2', 'gate_1.pt2']
    """
    if not isinstance(encoder, AdaptiveEncoder):
        raise TypeError(f"export_engine exports an AdaptiveEncoder, got {type(encoder).__name__}.")
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}.")
    if mode not in ("adaptive", "skip_only", "exit_only", "full"):
        raise ValueError(f"mode must be 'adaptive', 'skip_only', 'exit_only' or 'full', got {mode!r}.")
    if mode in ("adaptive", "skip_only") and not encoder.has_gates:
        raise ValueError(
            f"mode {mode!r} needs skip gates, but the encoder was built with_gates=False; "
            "export with mode='exit_only' or 'full'."
        )
    gate_threshold = encoder.adaptive_config.gate_threshold if gate_threshold is None else check_gate_threshold(
        gate_threshold)
    criterion = criterion if criterion is not None else EntropyExit(0.3)
    criterion_spec = criterion_to_dict(criterion)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; choose a new folder or delete it first.")
    config = encoder.config
    if config.model_type not in EXPORT_EMBEDDINGS:
        raise UnsupportedModelError(
            f"exporting model_type {config.model_type!r} is not supported; "
            f"supported: {', '.join(sorted(EXPORT_EMBEDDINGS))}."
        )
    attn_implementation = getattr(config, "_attn_implementation", None) or "eager"
    if format == "onnx":
        for package in ("onnx", "onnxscript"):
            try:
                __import__(package)
            except ModuleNotFoundError as error:
                raise ModuleNotFoundError(
                    f"format='onnx' needs {package}: pip install 'adaptive_depth[export]'."
                ) from error

    encoder.eval()
    parameter = next(encoder.parameters())
    dtype, device = parameter.dtype, parameter.device
    suffix = EXPORT_FORMATS[format]
    max_length = _max_length(config)
    length = min(max(example_length, 2), max_length)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, int(config.vocab_size), (2, length), generator=generator).to(device)
    mask = torch.ones(2, length, dtype=torch.long, device=device)
    mask[1, length // 2:] = 0
    hidden = torch.randn(2, length, int(config.hidden_size), generator=generator, dtype=dtype).to(device)
    adapter, base_model = encoder.adapter, encoder.backbone
    steps = encoder.num_steps
    layer_index = [adapter.module_index(config, step) for step in range(steps)]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        with torch.no_grad():
            embedding = EmbeddingStep(base_model).eval()
            example = {"input_ids": input_ids}
            if embedding.takes_token_types:
                example["token_type_ids"] = torch.zeros_like(input_ids)
            _export_one(embedding, example, "hidden_states", staging / f"embeddings{suffix}", format, max_length, opset)
            step_inputs = {"hidden_states": hidden, "attention_mask": mask}
            layers = adapter.layer_list(base_model)
            # MPNet's layers take the relative position bias its encoder computes (BACKBONES: batched_extra_args).
            position_bias = base_model.encoder if adapter.batched_extra_args else None
            for index in sorted(set(layer_index)):
                step = LayerStep(layers[index], attn_implementation, dtype, position_bias).eval()
                _export_one(step, step_inputs, "layer_output", staging / f"layer_{index}{suffix}", format, max_length, opset)
            uses_gates = mode in ("adaptive", "skip_only")
            for step_index in range(steps if uses_gates else 0):
                _export_one(GateStep(encoder.gates[step_index]).eval(), step_inputs, "p_skip",
                            staging / f"gate_{step_index}{suffix}", format, max_length, opset)
            uses_exits = mode in ("adaptive", "exit_only")
            for step_index in range(steps if uses_exits else 0):
                _export_one(HeadStep(encoder.exit_heads[step_index]).eval(), step_inputs, "logits",
                            staging / f"head_{step_index}{suffix}", format, max_length, opset)
            if not uses_exits:  # full and skip_only answer with the last head only
                _export_one(HeadStep(encoder.exit_heads[steps - 1]).eval(), step_inputs, "logits",
                            staging / f"head_{steps - 1}{suffix}", format, max_length, opset)
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "format": format,
            "model_type": config.model_type,
            "attn_implementation": attn_implementation,
            "dtype": str(dtype).removeprefix("torch."),
            "num_steps": steps,
            "num_labels": encoder.num_labels,
            "hidden_size": int(config.hidden_size),
            "max_length": max_length,
            "embedding_inputs": list(example),
            "embeddings": f"embeddings{suffix}",
            "layers": [f"layer_{index}{suffix}" for index in layer_index],
            "gates": [f"gate_{i}{suffix}" for i in range(steps)] if uses_gates else [],
            "heads": [f"head_{i}{suffix}" if uses_exits or i == steps - 1 else None for i in range(steps)],
            "mode": mode,
            "gate_threshold": gate_threshold,
            "criterion": criterion_spec,
            "torch_version": torch.__version__,
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


CRITERION_NAMES: tuple[str, ...] = get_args(CriterionName)


def _operating_point(encoder: AdaptiveEncoder, args: argparse.Namespace) -> tuple[ExitCriterion, float, str]:
    """The saved operating point (``encoder.adaptive_config``), with the command line's overrides."""
    saved = encoder.adaptive_config
    threshold = saved.threshold if args.threshold is None else args.threshold
    if args.criterion is None or args.criterion == saved.criterion:  # keep the saved criterion's options
        criterion = criterion_with_threshold(saved.make_criterion(), threshold)
    else:
        criterion = criterion_from_name(args.criterion, threshold)
    gate_threshold = saved.gate_threshold if args.gate_threshold is None else args.gate_threshold
    return criterion, gate_threshold, args.mode or str(saved.mode)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m adaptive_depth.export",
        description="Export a saved AdaptiveEncoder (AdaptiveEncoder.save_pretrained) as step graphs plus a manifest.",
    )
    parser.add_argument("model_dir", help="folder written by AdaptiveEncoder.save_pretrained")
    parser.add_argument("out_dir", help="new folder for the exported graphs (must not exist)")
    parser.add_argument("--format", required=True, choices=list(EXPORT_FORMATS), help="onnx or torch-export")
    parser.add_argument("--criterion", default=None, choices=CRITERION_NAMES,
                        help="exit criterion (default: the saved config's)")
    parser.add_argument("--threshold", type=float, default=None, help="exit threshold (default: the saved config's)")
    parser.add_argument("--gate-threshold", type=float, default=None,
                        help="skip when p_skip >= this (default: the saved config's, else 0.5)")
    parser.add_argument("--mode", default=None, choices=["adaptive", "skip_only", "exit_only", "full"],
                        help="engine mode (default: the saved config's, else adaptive with gates, exit_only without)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch.onnx's)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the SHA-256 check of the model's files (after a deliberate edit)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on a usage error)."""
    args = parse_args(argv)
    try:
        if Path(args.out_dir).exists():
            raise FileExistsError(f"{args.out_dir} already exists; choose a new folder or delete it first.")
        encoder = AdaptiveEncoder.from_pretrained(args.model_dir, verify=not args.no_verify)
        criterion, gate_threshold, mode = _operating_point(encoder, args)
        out_dir = export_engine(encoder, args.out_dir, args.format, criterion=criterion,
                                gate_threshold=gate_threshold, mode=mode, opset=args.opset)
    except (ValueError, FileExistsError, FileNotFoundError, ModuleNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out_dir} ({args.format}, mode={mode}, gate_threshold={gate_threshold}, {criterion})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
