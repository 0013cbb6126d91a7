"""Final norm + output projection + cross-entropy, never holding M x V logits.

Per chunk of tokens (``chunk_tokens`` rows at a time), with ``W' = W * g``::

    z    = r * (h @ W'.T)                       # logits of the chunk, fp32
    lse  = log(sum(exp(z)))                     # online max / sum-exp per tile
    loss = sum over valid rows of (lse - z[label])
    dz   = softmax(z) - onehot(label)           # 0 on ignored rows
    c    = sum(dz * z)                          # ZdZ
    dh   = r * (dz @ W') - (r**2 c / D) h       # RMSNorm bwd in the dgrad epilogue
    dW' += dz.T @ (r * h)                       # accumulated in fp32

The gradient is computed in the forward (the loss is a scalar, so backward
only scales it by the incoming gradient): peak memory is one chunk of logits
plus the weight-sized gradient accumulator, instead of M x V logits in bf16
plus their fp32 copy. Without autograd (``torch.no_grad()``, validation) only
the loss is computed. ``loss`` is the sum over tokens whose label is not
``ignore_index``, as TorchTitan's ``cross_entropy_loss`` returns.
"""

import torch

from .deferred_rmsnorm import (
    acc_dtype,
    deferred_norm_linear,
    fold_norm_weight,
    folded_weight_grad,
    rmsnorm_input_grad,
    row_sumsq,
    rstd_from_sumsq,
    rstd_scaled,
    unfold_weight_grads,
)

IGNORE_INDEX = -100


def check_labels(labels: torch.Tensor, vocab: int) -> None:
    """Fail on a label outside [0, vocab) other than ignore_index, as
    F.cross_entropy does (asynchronously on a GPU: no host sync)."""
    valid = ((labels >= 0) & (labels < vocab)) | (labels == IGNORE_INDEX)
    torch._assert_async(valid.all(), f"labels must be in [0, {vocab}) or {IGNORE_INDEX}")


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class RMSNormLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, norm_weight, weight, labels, eps, chunk_tokens, compute_grad):
        acc = acc_dtype(h.dtype)
        folded = fold_norm_weight(weight, norm_weight)
        loss = torch.zeros((), dtype=acc, device=h.device)
        if compute_grad:
            dh = torch.empty_like(h)
            dfolded = torch.zeros(weight.shape, dtype=acc, device=h.device)
        for start in range(0, h.shape[0], chunk_tokens):
            hc = h[start : start + chunk_tokens]
            lc = labels[start : start + chunk_tokens]
            rstd = rstd_from_sumsq(row_sumsq(hc), h.shape[-1], eps)
            z = deferred_norm_linear(hc, rstd, folded)
            valid = lc != IGNORE_INDEX
            target = lc.clamp(min=0)
            lse = torch.logsumexp(z, dim=-1)
            loss += torch.where(valid, lse - z.gather(1, target[:, None])[:, 0], 0).sum()
            if not compute_grad:
                continue
            dz = torch.softmax(z, dim=-1)
            dz.scatter_add_(1, target[:, None], torch.full_like(lse[:, None], -1.0))
            dz *= valid[:, None]
            zdz = (dz * z).sum(-1)
            dzr = rstd_scaled(dz, rstd, weight.dtype)
            dh[start : start + chunk_tokens] = rmsnorm_input_grad(dzr, hc, rstd, folded, zdz)
            dfolded += folded_weight_grad(dzr, hc)
        if compute_grad:
            dweight, dnorm = unfold_weight_grads(dfolded, weight, norm_weight)
            ctx.save_for_backward(dh, dnorm, dweight)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        dh, dnorm, dweight = ctx.saved_tensors
        return (
            dh * dloss.to(dh.dtype),
            dnorm * dloss.to(dnorm.dtype),
            dweight * dloss.to(dweight.dtype),
            None,
            None,
            None,
            None,
        )


def rmsnorm_linear_cross_entropy(
    h: torch.Tensor,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Summed cross-entropy of ``RMSNorm(h) @ weight.T`` against ``labels``.

    ``h`` (M, D) pre-norm hidden states, ``weight`` (V, D), ``labels`` (M,)
    int64 with ``-100`` for ignored tokens. Returns a 0-d tensor in the
    accumulator dtype (float32 for 16-bit inputs).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    check_labels(labels, weight.shape[0])
    return RMSNormLinearCrossEntropy.apply(h, norm_weight, weight, labels, eps, chunk_tokens,
                                           needs_grad(h, norm_weight, weight))
