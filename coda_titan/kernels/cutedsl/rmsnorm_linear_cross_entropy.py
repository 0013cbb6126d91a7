"""Final norm + output + cross-entropy on quack's SM90 GEMM
(math: ``..rmsnorm_linear_cross_entropy``).

Per chunk of tokens:
  1. ``z = r * (h @ W'.T)``: the epilogue stores the chunk's bf16 logits (as
     TorchTitan's bf16 logits are) and reduces per-tile log-sum-exp partials
     (online max / sum-exp) and the target logit. Any vocab size V runs here:
     the logits rows are padded to a multiple of 8 columns (TMA needs 16-byte
     row strides), the GEMM writes the first V, and the padding holds -inf,
     so step 2 gives it probability 0 and a zero gradient; steps 3 and 4 read
     only the first V columns (the GEMMs' ragged K / M edges are masked).
  2. quack's CuTe DSL cross-entropy backward turns the logits into
     ``dzr = r * (softmax(z) - onehot)`` in place (0 on ignored tokens), with
     ``r`` as its per-row upstream gradient.
  3. ``dzr @ W'``: the dgrad GEMM's epilogue stores fp32 ``acc`` and reduces
     ``c = sum(acc * h)``, which equals ZdZ ``sum(dz * z)`` because
     ``z = r * (W' h)``; ``c`` is complete only after every column tile, so one
     pass over the (chunk, D) result applies ``dh = acc - (r**2 c / D) h``.
  4. ``dW' += dzr.T @ h``: wgrad accumulated in fp32 by the GEMM's TMA reduce-add.
Peak memory: one chunk of bf16 logits plus the fp32 weight-gradient accumulator.
Without autograd (validation) only step 1 runs.
"""

import torch
from quack.cross_entropy import cross_entropy_bwd
from quack.epilogue import gemm_epilogue
from quack.epilogue.library import identity_epi
from quack.epilogue.ops import ColVecLoad, ColVecReduce, ColVecSelect, OnlineLSEReduce

from ..fallback import report_fallback, unsupported_reason
from ..kernel_op import kernel_op
from ..rmsnorm_linear_cross_entropy import (
    IGNORE_INDEX, RMSNormLinearCrossEntropy, check_labels, needs_grad)
from ..rmsnorm_linear_cross_entropy import rmsnorm_linear_cross_entropy as reference
from .gemm import TILES, aligned, fold_weight, tile_partials
from .row_kernels import row_rstd
from .unfold_grads import unfold_grads

CFG_LOGITS = TILES["logits"]
CFG_DGRAD = TILES["lm_head_dgrad"]
CFG_WGRAD = TILES["lm_head_wgrad"]

_target = ColVecLoad("target")


@gemm_epilogue(
    ops={"rstd": ColVecLoad("rstd")},
    outs={"lse": OnlineLSEReduce("lse"), "target_logit": ColVecSelect("target_logit", idx_op=_target)},
    extra_ops=(_target,),
)
def rstd_logits_lse_epi(acc, rstd):
    """z = r * acc: stored, folded into per-tile log-sum-exp, target column selected."""
    z = acc * rstd
    return {"D": z, "lse": z, "target_logit": z}


@gemm_epilogue(reduces={"zdz": ColVecReduce("zdz", scaled=True)})
def dgrad_zdz_epi(acc, x):
    """Store acc = dzr @ W'; reduce sum(acc * x) = sum(dz * z) per row."""
    return {"D": acc, "zdz": (acc, x)}


def padded_vocab(vocab: int) -> int:
    return -(-vocab // 8) * 8


@kernel_op("coda::rmsnorm_logits_lse")
def rmsnorm_logits_lse(
    h: torch.Tensor, rstd: torch.Tensor, folded_weight: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (M, V padded to a multiple of 8; -inf past V), log-sum-exp, target logit)."""
    h, rstd, folded_weight, target = aligned(h, rstd, folded_weight, target)
    m, vocab = h.shape[0], folded_weight.shape[0]
    padded = torch.empty(m, padded_vocab(vocab), dtype=h.dtype, device=h.device)
    padded[:, vocab:] = float("-inf")
    lse = tile_partials(m, vocab, CFG_LOGITS, h.device)
    target_logit = torch.zeros(m, dtype=torch.float32, device=h.device)
    rstd_logits_lse_epi.gemm(h, folded_weight, padded[:, :vocab], None, epi_args=dict(
        rstd=rstd, lse=lse, target=target, target_logit=target_logit), **CFG_LOGITS)
    return padded, torch.logsumexp(lse, dim=-1), target_logit


@rmsnorm_logits_lse.register_fake
def _(h, rstd, folded_weight, target):
    m = h.shape[0]
    return (h.new_empty(m, padded_vocab(folded_weight.shape[0])),
            h.new_empty(m, dtype=torch.float32), h.new_empty(m, dtype=torch.float32))


@torch.compile(dynamic=False)
def rmsnorm_correction(acc, h, corr):
    """acc + corr * h, rounded once to h's dtype."""
    return (acc + h.float() * corr[:, None]).to(h.dtype)


@kernel_op("coda::rmsnorm_lm_head_dgrad")
def rmsnorm_lm_head_dgrad(
    dzr: torch.Tensor, folded_weight: torch.Tensor, h: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """dh = dzr @ W' - (r**2 c / D) h, c = sum(dz * z) reduced in the epilogue."""
    dzr, folded_weight, h, rstd = aligned(dzr, folded_weight, h, rstd)
    acc = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    partials = tile_partials(h.shape[0], h.shape[1], CFG_DGRAD, h.device)
    dgrad_zdz_epi.gemm(dzr, folded_weight.mT, acc, None, epi_args=dict(x=h, zdz=partials),
                       **CFG_DGRAD)
    corr = rstd.square() * partials.sum(-1) * (-1.0 / h.shape[1])
    return rmsnorm_correction(acc, h, corr)


@rmsnorm_lm_head_dgrad.register_fake
def _(dzr, folded_weight, h, rstd):
    return torch.empty_like(h)


@torch.library.custom_op("coda::wgrad_fp32", mutates_args=("out",), device_types="cuda")
def wgrad_fp32(out: torch.Tensor, dz: torch.Tensor, x: torch.Tensor, accumulate: bool) -> None:
    """out (N, K) fp32 (+)= dz.T @ x, dz (M, N), x (M, K)."""
    dz, x = aligned(dz, x)
    identity_epi.gemm(dz.mT, x.mT, out, None, epi_args={}, add_to_output=accumulate, **CFG_WGRAD)


class RMSNormLinearCrossEntropyKernel(RMSNormLinearCrossEntropy):
    """The reference's backward (scale the gradients computed here) with a kernel forward."""

    @staticmethod
    def forward(ctx, h, norm_weight, weight, labels, eps, chunk_tokens, compute_grad):
        folded = fold_weight([weight], norm_weight, False)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        if compute_grad:
            dh = torch.empty_like(h)
            dfolded = torch.empty(weight.shape, dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            hc, target = h[rows], labels[rows]
            rstd = row_rstd(hc, eps)
            logits, lse, target_logit = rmsnorm_logits_lse(hc, rstd, folded, target)
            loss += torch.where(target != IGNORE_INDEX, lse - target_logit, 0.0).sum()
            if not compute_grad:
                continue
            dzr = cross_entropy_bwd(logits, target, rstd, lse, ignore_index=IGNORE_INDEX,
                                    inplace_backward=True)[:, :weight.shape[0]]
            dh[rows] = rmsnorm_lm_head_dgrad(dzr, folded, hc, rstd)
            wgrad_fp32(dfolded, dzr, hc, start > 0)
        if compute_grad:
            dweight, dnorm = unfold_grads(dfolded, [weight], norm_weight, False)
            ctx.save_for_backward(dh, dnorm, dweight)
        return loss


def rmsnorm_linear_cross_entropy(h, norm_weight, weight, labels, eps, chunk_tokens=1024, *,
                                 strict=False):
    reason = unsupported_reason(h, weights=(weight,), any_rows=True)
    if reason is None and chunk_tokens % 8 != 0:
        reason = f"chunk_tokens {chunk_tokens} not a multiple of 8"
    if reason is not None:
        report_fallback("rmsnorm_linear_cross_entropy", reason, strict)
        return reference(h, norm_weight, weight, labels, eps, chunk_tokens)
    check_labels(labels, weight.shape[0])
    return RMSNormLinearCrossEntropyKernel.apply(h, norm_weight, weight, labels, eps, chunk_tokens,
                                                 needs_grad(h, norm_weight, weight))
