"""adaptive_depth: run only the depth each input needs.

Skip gates jump over layers, exit heads stop when the prediction is confident, and a
cross-layer contrastive loss makes intermediate layers good enough to exit from
(SmartBERT, Hu et al., IJCAI 2023), on any supported Hugging Face encoder.
"""

from adaptive_depth.backbones import BACKBONES, BackboneAdapter, LayerRunner, UnsupportedModelError, get_backbone
from adaptive_depth.config import AdaptiveEncoderConfig
from adaptive_depth.contrastive import ContrastiveOutput, CrossLayerInfoNCE, cross_layer_info_nce
from adaptive_depth.encoder import AdaptiveEncoder, AdaptiveEncoderOutput, skip_regularizer
from adaptive_depth.exits import (
    EntropyExit,
    ExitCriterion,
    ExitDecision,
    ExitHead,
    ExitHeadOutput,
    MaxProbExit,
    PatienceExit,
    PoolerExitHead,
    entropy,
)
from adaptive_depth.gates import GateSchedule, SkipGate, SkipGateOutput, StraightThroughHard, straight_through_hard

__version__ = "0.1.0.dev0"

__all__ = [
    "BACKBONES",
    "AdaptiveEncoder",
    "AdaptiveEncoderConfig",
    "AdaptiveEncoderOutput",
    "BackboneAdapter",
    "ContrastiveOutput",
    "CrossLayerInfoNCE",
    "EntropyExit",
    "ExitCriterion",
    "ExitDecision",
    "ExitHead",
    "ExitHeadOutput",
    "GateSchedule",
    "LayerRunner",
    "MaxProbExit",
    "PatienceExit",
    "PoolerExitHead",
    "SkipGate",
    "SkipGateOutput",
    "StraightThroughHard",
    "UnsupportedModelError",
    "cross_layer_info_nce",
    "entropy",
    "get_backbone",
    "skip_regularizer",
    "straight_through_hard",
]
