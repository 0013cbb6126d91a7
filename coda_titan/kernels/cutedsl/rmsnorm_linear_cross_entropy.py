"""Final norm + output + cross-entropy on quack's SM90 GEMM
(math: ``..rmsnorm_linear_cross_entropy``).

Per chunk of tokens:
  1. ``z = r * (h @ W'.T)``: the epilogue stores the bf16 logits of the chunk
     (as TorchTitan's bf16 logits are) and reduces per-tile log-sum-exp
     partials (online max / sum-exp) and the target logit.
  2. One elementwise pass (torch.compile-generated) turns the chunk's logits
     into ``dzr = r * (softmax(z) - onehot)`` in place and ``c = sum(dz * z)``.
  3. ``dh = dzr @ W' - (r**2 c / D) h``: dgrad with the RMSNorm backward epilogue.
  4. ``dW' += dzr.T @ h``: wgrad accumulated in fp32 by the GEMM's TMA reduce-add.
Peak memory: one chunk of bf16 logits plus the fp32 weight-gradient accumulator.
"""

import torch
from quack.epilogue import gemm_epilogue
from quack.epilogue.library import identity_epi
from quack.epilogue.ops import ColVecLoad, ColVecReduce, ColVecSelect, OnlineLSEReduce

from ..deferred_rmsnorm import rstd_from_sumsq, unfold_weight_grads
from ..rmsnorm_linear_cross_entropy import IGNORE_INDEX, RMSNormLinearCrossEntropy
from ..rmsnorm_linear_cross_entropy import rmsnorm_linear_cross_entropy as reference
from .gemm import TILES, cdiv, unsupported_reason, warn_fallback
from .rmsnorm_linear_grad import rmsnorm_linear_grad

CFG_LOGITS = TILES["logits"]
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


@torch.library.custom_op("coda::rmsnorm_logits_lse", mutates_args=(), device_types="cuda")
def rmsnorm_logits_lse(
    h: torch.Tensor, rstd: torch.Tensor, folded_weight: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, vocab = h.shape[0], folded_weight.shape[0]
    logits = torch.empty(m, vocab, dtype=h.dtype, device=h.device)
    lse = torch.empty(m, cdiv(vocab, CFG_LOGITS["tile_N"]), dtype=torch.float32, device=h.device)
    target_logit = torch.zeros(m, dtype=torch.float32, device=h.device)
    rstd_logits_lse_epi.gemm(h, folded_weight, logits, None, epi_args=dict(
        rstd=rstd, lse=lse, target=target, target_logit=target_logit), **CFG_LOGITS)
    return logits, torch.logsumexp(lse, dim=-1), target_logit


@rmsnorm_logits_lse.register_fake
def _(h, rstd, folded_weight, target):
    m = h.shape[0]
    return (h.new_empty(m, folded_weight.shape[0]), h.new_empty(m, dtype=torch.float32),
            h.new_empty(m, dtype=torch.float32))


@torch.library.custom_op("coda::accumulate_wgrad", mutates_args=("out",), device_types="cuda")
def accumulate_wgrad(out: torch.Tensor, dz: torch.Tensor, x: torch.Tensor) -> None:
    """out (N, K) fp32 += dz.T @ x, dz (M, N), x (M, K)."""
    identity_epi.gemm(dz.mT, x.mT, out, None, epi_args={}, add_to_output=True, **CFG_WGRAD)


@torch.compile(dynamic=True)
def cross_entropy_grad(logits, lse, target_logit, target, scale):
    """In place: logits -> scale * (softmax - onehot); returns sum(dz * z) per row."""
    z = logits.float()
    valid = target != IGNORE_INDEX
    p = torch.exp(z - lse[:, None])
    zdz = torch.where(valid, (p * z).sum(-1) - target_logit, 0.0)
    onehot = torch.arange(z.shape[1], device=z.device)[None, :] == target[:, None]
    logits.copy_(((p - onehot.float()) * (scale * valid)[:, None]).to(logits.dtype))
    return zdz


class RMSNormLinearCrossEntropyKernel(RMSNormLinearCrossEntropy):
    """The reference's backward (scale the gradients computed here) with a kernel forward."""

    @staticmethod
    def forward(ctx, h, norm_weight, weight, labels, eps, chunk_tokens):
        folded = (weight.float() * norm_weight.float()).to(weight.dtype)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h)
        dfolded = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_tokens):
            hc = h[start : start + chunk_tokens]
            target = labels[start : start + chunk_tokens]
            sumsq = torch.linalg.vector_norm(hc, dim=-1, dtype=torch.float32).square()
            rstd = rstd_from_sumsq(sumsq, h.shape[-1], eps)
            logits, lse, target_logit = rmsnorm_logits_lse(hc, rstd, folded, target)
            valid = target != IGNORE_INDEX
            loss += torch.where(valid, lse - target_logit, 0.0).sum()
            zdz = cross_entropy_grad(logits, lse, target_logit, target, rstd)
            dh[start : start + chunk_tokens] = rmsnorm_linear_grad(
                logits, folded, hc, rstd.square() * zdz, None)
            accumulate_wgrad(dfolded, logits, hc)
        dweight, dnorm = unfold_weight_grads(dfolded, weight, norm_weight)
        ctx.save_for_backward(dh, dnorm, dweight)
        return loss


def rmsnorm_linear_cross_entropy(h, norm_weight, weight, labels, eps, chunk_tokens=1024):
    reason = unsupported_reason(h, weight)
    if reason is None and chunk_tokens % 8 != 0:
        reason = f"chunk_tokens {chunk_tokens} not a multiple of 8"
    if reason is not None:
        warn_fallback("rmsnorm_linear_cross_entropy", reason)
        return reference(h, norm_weight, weight, labels, eps, chunk_tokens)
    return RMSNormLinearCrossEntropyKernel.apply(h, norm_weight, weight, labels, eps, chunk_tokens)
