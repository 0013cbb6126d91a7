"""nn.Modules running the CODA ops; parameter names match TorchTitan's llama3."""

from .block import CodaTransformerBlock
from .lm_head import DeferredRMSNorm, FusedLMHead, LMHeadInput, RMSNormLinearCrossEntropyLoss

__all__ = [
    "CodaTransformerBlock",
    "DeferredRMSNorm",
    "FusedLMHead",
    "LMHeadInput",
    "RMSNormLinearCrossEntropyLoss",
]
