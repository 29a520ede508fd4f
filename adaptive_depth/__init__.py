"""adaptive_depth: run only the depth each input needs.

Skip gates jump over layers, exit heads stop when the prediction is confident, and a
cross-layer contrastive loss makes intermediate layers good enough to exit from
(SmartBERT, Hu et al., IJCAI 2023), on any supported Hugging Face encoder.
"""

from adaptive_depth.backbones import BACKBONES, BackboneAdapter, LayerRunner, UnsupportedModelError, get_backbone
from adaptive_depth.classifiers import CLASSIFIER_HEADS
from adaptive_depth.config import AdaptiveEncoderConfig
from adaptive_depth.contrastive import ContrastiveOutput, CrossLayerInfoNCE, cross_layer_info_nce
from adaptive_depth.encoder import AdaptiveEncoder, AdaptiveEncoderOutput
from adaptive_depth.engine import AdaptiveInferenceEngine, EngineOutput
from adaptive_depth.exits import (
    ClassifierExitHead,
    EntropyExit,
    ExitCriterion,
    ExitDecision,
    ExitHead,
    ExitHeadOutput,
    MaxProbExit,
    PatienceExit,
    PoolerExitHead,
    ToleranceExit,
    entropy,
    predictions_from_logits,
)
from adaptive_depth.gates import (
    GateSchedule,
    SkipGate,
    SkipGateOutput,
    StraightThroughHard,
    straight_through_hard,
)
from adaptive_depth.losses import LossTerms, budget_penalty, skip_reward
from adaptive_depth.model_folder import ModelFolderError
from adaptive_depth.objectives import (
    BudgetPenalty,
    DistillExits,
    LabelExits,
    LastHead,
    SkipReward,
    WeightedExits,
    exit_objective,
    gate_objective,
)

__version__ = "0.1.0.dev0"

# Names whose modules import torchmetrics (seconds): loaded on first use, so that
# `import adaptive_depth` stays as fast as torch + transformers.
_LAZY = {
    "AdaptivePipeline": "adaptive_depth.pipeline",
    "Calibration": "adaptive_depth.calibration",
    "Certificate": "adaptive_depth.certificate",
    "CostAccumulator": "adaptive_depth.metrics",
    "ExportedEngine": "adaptive_depth.export_runtime",
    "ExportedPipeline": "adaptive_depth.export_pipeline",
    "Prediction": "adaptive_depth.pipeline",
    "calibrate_operating_point": "adaptive_depth.calibration",
    "calibrate_threshold": "adaptive_depth.calibration",
    "certify_threshold": "adaptive_depth.certify",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adaptive_depth' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "BACKBONES",
    "CLASSIFIER_HEADS",
    "AdaptiveEncoder",
    "AdaptiveEncoderConfig",
    "AdaptiveEncoderOutput",
    "AdaptiveInferenceEngine",
    "AdaptivePipeline",
    "BackboneAdapter",
    "BudgetPenalty",
    "Calibration",
    "Certificate",
    "ClassifierExitHead",
    "ContrastiveOutput",
    "CostAccumulator",
    "CrossLayerInfoNCE",
    "DistillExits",
    "EngineOutput",
    "EntropyExit",
    "ExitCriterion",
    "ExitDecision",
    "ExitHead",
    "ExitHeadOutput",
    "ExportedEngine",
    "ExportedPipeline",
    "GateSchedule",
    "LabelExits",
    "LastHead",
    "LossTerms",
    "LayerRunner",
    "MaxProbExit",
    "ModelFolderError",
    "PatienceExit",
    "PoolerExitHead",
    "Prediction",
    "SkipGate",
    "SkipReward",
    "SkipGateOutput",
    "StraightThroughHard",
    "ToleranceExit",
    "UnsupportedModelError",
    "WeightedExits",
    "budget_penalty",
    "calibrate_operating_point",
    "calibrate_threshold",
    "certify_threshold",
    "cross_layer_info_nce",
    "entropy",
    "exit_objective",
    "gate_objective",
    "get_backbone",
    "predictions_from_logits",
    "skip_reward",
    "straight_through_hard",
]
