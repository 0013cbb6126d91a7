"""Final norm + output projection + loss without materialized logits.

TorchTitan's ``Transformer.forward`` ends with ``self.output(self.norm(h))``
and the trainer calls ``loss_fn(pred, labels)``. After conversion ``norm`` and
``output`` keep their parameters and names but defer their work: they return
an ``LMHeadInput`` (the pre-norm hidden states plus the two weights), and the
``coda_llama3`` train spec's loss turns it into the summed cross-entropy with
the chunked fused op. ``LMHeadInput.logits()`` still gives full logits for
code that needs them (generation, evaluation scripts).
"""

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..backend import resolve_backend
from ..kernels import ops_for
from ..kernels.deferred_rmsnorm import resolve_eps
from .autocast import compute_weights, outside_autocast


@dataclass(frozen=True)
class LMHeadInput:
    """What a converted model returns instead of logits."""

    hidden: torch.Tensor
    """Pre-norm hidden states (batch, seqlen, dim)."""
    norm_weight: torch.Tensor
    eps: float
    weight: torch.Tensor | None = None
    """Output projection (vocab, dim); None until the output layer has run."""
    backend: str = "reference"
    strict: bool = False
    """The kernels were insisted on (``backend = "cutedsl"``): no reference fallback."""
    chunk_tokens: int = 1024

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        """Sum of token cross-entropies over labels != -100 (TorchTitan's contract)."""
        dim = self.hidden.shape[-1]
        (weight,) = compute_weights(self.hidden, self.weight)
        with outside_autocast(self.hidden):
            return ops_for(self.backend, self.strict).rmsnorm_linear_cross_entropy(
                self.hidden.reshape(-1, dim), self.norm_weight, weight,
                labels.reshape(-1), self.eps, self.chunk_tokens,
            )

    def logits(self) -> torch.Tensor:
        """Full logits, as the unconverted model returns them (materializes M x V)."""
        normed = nn.functional.rms_norm(
            self.hidden, (self.hidden.shape[-1],), self.norm_weight, self.eps
        )
        return normed @ self.weight.t()


class DeferredRMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` whose forward hands its input and weight on, unnormalized."""

    def forward(self, x: torch.Tensor) -> LMHeadInput:
        return LMHeadInput(x, self.weight, resolve_eps(self.eps, x.dtype))


class FusedLMHead(nn.Linear):
    """``nn.Linear`` output layer that completes an ``LMHeadInput`` instead of projecting."""

    backend: str = "reference"
    strict: bool = False
    chunk_tokens: int = 1024

    def forward(self, pending: LMHeadInput) -> LMHeadInput:
        if not isinstance(pending, LMHeadInput):
            raise TypeError(
                "FusedLMHead expects the output of DeferredRMSNorm; convert `norm` "
                "and `output` together (coda_titan converter, fuse_norm_output_loss)"
            )
        return replace(pending, weight=self.weight, backend=self.backend, strict=self.strict,
                       chunk_tokens=self.chunk_tokens)


class RMSNormLinearCrossEntropyLoss(nn.Module):
    """Standalone final norm + output + loss for custom models.

    ``forward(h, labels)`` returns the summed cross-entropy of
    ``output(norm(h))``; parameters are ``norm.weight`` and ``output.weight``,
    as in TorchTitan's ``Transformer``.
    """

    def __init__(self, dim: int, vocab_size: int, eps: float = 1e-5,
                 backend: str = "auto", chunk_tokens: int = 1024):
        super().__init__()
        self.norm = DeferredRMSNorm(dim, eps=eps)
        self.output = FusedLMHead(dim, vocab_size, bias=False)
        self.output.backend = resolve_backend(backend)
        self.output.strict = backend == "cutedsl"
        self.output.chunk_tokens = chunk_tokens

    def forward(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h)).loss(labels)
