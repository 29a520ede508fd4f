"""Run an engine exported by :func:`adaptive_depth.export.export_engine`: the skip/exit loop in Python.

:class:`ExportedEngine` reads ``manifest.json`` and runs the static-shape step graphs with one of
two backends, ``torch.export`` programs (``.pt2``) or ONNX Runtime sessions (``.onnx``). Its loop
is the one of :class:`adaptive_depth.engine.AdaptiveInferenceEngine` (active-row compaction, the
last head answers for the rows still there), so it takes the same decisions; the trace has the
engine's decision fields, not its MACs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from adaptive_depth.config import check_gate_threshold
from adaptive_depth.exits import ExitCriterion, predictions_from_logits
from adaptive_depth.export import MANIFEST_VERSION, criterion_from_dict
from adaptive_depth.engine import ExitTrace, skip_exit_loop

__all__ = ["ExportedEngine", "ExportedEngineOutput"]

StepFunction = Callable[..., Tensor]


# What ExportedEngine returns: the engine's decisions without the MACs (the graphs run; the
# cost of what ran is the eager engine's business).
ExportedEngineOutput = ExitTrace


def _torch_export_step(path: Path) -> StepFunction:
    module = torch.export.load(str(path)).module()
    return lambda **inputs: module(**inputs)


def _onnx_step(path: Path, num_threads: int | None) -> StepFunction:
    try:
        import onnxruntime
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "running an ONNX export needs onnxruntime: pip install 'adaptive_depth[export]'."
        ) from error
    options = onnxruntime.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [node.name for node in session.get_inputs()]

    def run(**inputs: Tensor) -> Tensor:
        # ONNX Runtime may drop an input the graph does not read; feed only the declared ones.
        feed = {name: inputs[name].contiguous().numpy() for name in names}
        return torch.from_numpy(session.run(None, feed)[0])

    return run


class ExportedEngine:
    """The adaptive engine over exported step graphs, with its operating point from the manifest.

    Args:
        folder: a folder written by :func:`adaptive_depth.export.export_engine`.
        num_threads: ONNX Runtime intra-op threads (``None``: its default, one per core);
            ignored for ``torch.export`` programs, which use torch's threads.
        criterion, gate_threshold: override the manifest's operating point (the mode is fixed
            at export time, since it decides which graphs exist).

    Example:
        >>> engine = ExportedEngine("exported-mrpc")  # doctest: +SKIP
        >>> out = engine(input_ids, attention_mask, token_type_ids)  # doctest: +SKIP
    """

    def __init__(
        self,
        folder: str | Path,
        num_threads: int | None = None,
        *,
        criterion: ExitCriterion | None = None,
        gate_threshold: float | None = None,
    ) -> None:
        folder = Path(folder)
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{manifest_path} not found; pass a folder written by adaptive_depth.export.export_engine."
            )
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("manifest_version") != MANIFEST_VERSION:
            raise ValueError(
                f"{manifest_path} has manifest_version {manifest.get('manifest_version')!r}, this "
                f"adaptive_depth reads version {MANIFEST_VERSION}; re-export the model."
            )
        self.manifest = manifest
        self.format: str = manifest["format"]
        self.mode: str = manifest["mode"]
        self.num_steps: int = manifest["num_steps"]
        self.num_labels: int = manifest["num_labels"]
        self.max_length: int = manifest["max_length"]
        self.gate_threshold = check_gate_threshold(manifest["gate_threshold"] if gate_threshold is None else gate_threshold)
        self.criterion = criterion if criterion is not None else criterion_from_dict(manifest["criterion"])
        loaded: dict[str, StepFunction] = {}

        def load(name: str | None) -> StepFunction | None:
            if name is None:
                return None
            if name not in loaded:
                path = folder / name
                loaded[name] = _onnx_step(path, num_threads) if self.format == "onnx" else _torch_export_step(path)
            return loaded[name]

        self.embeddings = load(manifest["embeddings"])
        self.layers = [load(name) for name in manifest["layers"]]
        self.gates = [load(name) for name in manifest["gates"]]
        self.heads = [load(name) for name in manifest["heads"]]
        self.embedding_inputs: list[str] = manifest["embedding_inputs"]

    @torch.inference_mode()
    def __call__(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> ExportedEngineOutput:
        """Classify a batch, skipping and exiting per row (right padding only).

        Args:
            input_ids: ``[B, N]`` token ids, ``N <= max_length``.
            attention_mask: ``[B, N]``, 1 for tokens, 0 for padding (``None``: no padding).
            token_type_ids: ``[B, N]`` segment ids (``None``: zeros); ignored by DistilBERT.
        """
        if input_ids.ndim != 2 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty [B, N] tensor, got shape {tuple(input_ids.shape)}.")
        batch_size, num_tokens = input_ids.shape
        if num_tokens > self.max_length:
            raise ValueError(f"inputs have {num_tokens} positions, the export allows {self.max_length}; truncate them.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif tuple(attention_mask.shape) != (batch_size, num_tokens):
            raise ValueError(f"attention_mask must have the shape of input_ids, got {tuple(attention_mask.shape)}.")
        if not bool(attention_mask.bool().any(dim=-1).all()):
            raise ValueError("every row of attention_mask needs at least one real token.")
        mask = attention_mask.long()
        inputs = {"input_ids": input_ids.long(), "token_type_ids": (
            torch.zeros_like(mask) if token_type_ids is None else token_type_ids.long())}
        hidden = self.embeddings(**{name: inputs[name] for name in self.embedding_inputs})
        return self._loop(hidden, mask)

    def _loop(self, hidden: Tensor, mask: Tensor) -> ExportedEngineOutput:
        """The engine's own loop (:func:`adaptive_depth.engine.skip_exit_loop`) over the step graphs."""
        trace = skip_exit_loop(_ExportedRows(self, mask), hidden, num_steps=self.num_steps, num_labels=self.num_labels,
                               mode=self.mode, criterion=self.criterion, gate_threshold=self.gate_threshold)
        predictions = predictions_from_logits(trace.logits)
        return ExportedEngineOutput(
            logits=trace.logits,
            predictions=predictions,
            exit_layer=trace.exit_layer,
            layers_run=trace.layers_run,
            layers_skipped=trace.gates_run & ~trace.layers_run,
            heads_run=trace.heads_run,
            gates_run=trace.gates_run,
        )

    def __repr__(self) -> str:
        return (f"ExportedEngine(format={self.format!r}, mode={self.mode!r}, steps={self.num_steps}, "
                f"gate_threshold={self.gate_threshold}, criterion={self.criterion!r})")


class _ExportedRows:
    """:class:`~adaptive_depth.engine.StepRows` over exported step graphs: the token mask is all they need."""

    def __init__(self, engine: ExportedEngine, mask: Tensor) -> None:
        self.engine, self.mask = engine, mask

    def select(self, rows: Tensor) -> _ExportedRows:
        return _ExportedRows(self.engine, self.mask.index_select(0, rows))

    def gate(self, step: int, hidden: Tensor) -> Tensor:
        return self.engine.gates[step](hidden_states=hidden, attention_mask=self.mask)

    def layer(self, step: int, hidden: Tensor) -> Tensor:
        return self.engine.layers[step](hidden_states=hidden, attention_mask=self.mask)

    def head(self, step: int, hidden: Tensor) -> Tensor:
        return self.engine.heads[step](hidden_states=hidden, attention_mask=self.mask)
