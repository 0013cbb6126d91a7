"""FlashAttention-4 on the packed QKV, SM90 (math: ``..packed_attention``).

forward
  flash-attn-4's ``_flash_attn_fwd`` on q, k and v as views of the packed
  (B, S, Hq + 2 Hkv, D) tensor, which it reads in place (last stride 1, data
  16-byte aligned, other strides multiples of 16 bytes): causal, native GQA.
  It returns ``out`` and the row log-sum-exp ``lse`` the backward needs.
backward
  one ``dqkv`` buffer in the packing of ``qkv``; its three head ranges go to
  ``_flash_attn_bwd`` as the preallocated dq, dk and dv, which it checks for
  shape only and writes through their strides (for GQA its dk/dv are reduced
  in fp32 accumulators and converted into the views by its postprocess
  kernel). The QKV+RoPE backward reads ``dqkv`` directly: no concatenation.
  Given ``[q, k, v]`` (separate projections), the gradients are three tensors.

flash-attn-4 4.0.0b36 registers no custom op, and its public
``flash_attn_func`` allocates its own gradients (autograd would then
concatenate them: half the gain lost, measured). So its private
``_flash_attn_fwd`` / ``_flash_attn_bwd`` are called here (the version is
pinned, and checked at start-up by ``backend.flash4_unavailable_reason``),
wrapped as torch.library custom ops: per-block torch.compile traces them
without a graph break, full activation checkpointing recomputes the forward,
and TorchTitan's selective op AC saves its outputs as it saves its SDPA ops'.

Its JIT compiles each configuration on the first call (``scripts/jit_time.py``
measures it); ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1``, set here unless the
environment says otherwise, keeps the object code on disk
(``FLASH_ATTENTION_CUTE_DSL_CACHE_DIR``, default
``/tmp/$USER/flash_attention_cute_dsl_cache``).
"""

import os
import warnings

import torch
from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list
from torchtitan.models.llama3.model.model import Attention

from ..fallback import report_fallback
from ..kernel_op import kernel_op
from ..packed_attention import packed_attention as reference
from ..packed_attention import split_heads


def flash4_interface():
    """``flash_attn.cute.interface``, imported on first use. flash-attn-4 reads its
    cache switch when first imported, so it is set before."""
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    from flash_attn.cute import interface

    return interface


def _layout_reason(t: torch.Tensor) -> str | None:
    """Why the kernel cannot read ``t`` in place (flash-attn-4's
    ``_is_aligned_layout``; it would copy it silently), or None."""
    if t.stride(-1) != 1:
        return "last dimension not contiguous"
    if t.data_ptr() % 16:
        return "data not 16-byte aligned"
    if any(s % (16 // t.element_size()) for s in t.stride()[:-1]):
        return f"strides {t.stride()} not multiples of 16 bytes"
    return None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Called inside the custom op, which runs eagerly also under torch.compile."""
    if message in _warned:
        return
    _warned.add(message)
    warnings.warn(f"coda_titan flash4 attention: {message}", stacklevel=3)


def _unsupported_reason(qkv: list[torch.Tensor]) -> str | None:
    """Why these tensors cannot go to the kernel at all, or None. (Its head dims
    and TorchTitan's mask are checked at start-up: ``backend.resolve_attention``.)"""
    for t in qkv:
        if not t.is_cuda:
            return "tensor not on a CUDA device"
        if t.dtype != torch.bfloat16:
            return f"dtype {t.dtype} (the kernels take bfloat16)"
    return None


def _kernel_heads(qkv: list[torch.Tensor], n_heads: int) -> tuple[torch.Tensor, ...]:
    """``split_heads(qkv)``, or, where a head range is not in the kernel's layout,
    that of fresh contiguous copies (warning once per reason)."""
    heads = split_heads(qkv, n_heads)
    reason = next(filter(None, map(_layout_reason, heads)), None)
    if reason is None:
        return heads
    _warn_once(f"QKV copied to a contiguous tensor ({reason})")
    return split_heads([t.clone(memory_format=torch.contiguous_format) for t in qkv], n_heads)


def _gradient_buffers(qkv: list[torch.Tensor]) -> list[torch.Tensor]:
    """One fresh contiguous gradient per input: ``[dqkv]`` for the packed QKV."""
    return [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in qkv]


@kernel_op("coda::flash4_attention", device_type=None)
def flash4_attention(qkv: list[torch.Tensor], n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: causal attention (B, S, Hq, D) of ``[packed]`` or ``[q, k, v]``
    (``split_heads``) and its row log-sum-exp (B, Hq, S) in fp32."""
    q, k, v = _kernel_heads(qkv, n_heads)
    out, lse, *_ = flash4_interface()._flash_attn_fwd(
        q, k, v, softmax_scale=q.shape[-1] ** -0.5, causal=True, return_lse=True
    )
    return out, lse


@flash4_attention.register_fake
def _(qkv, n_heads):
    q, _, _ = split_heads(qkv, n_heads)
    batch, seqlen, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(batch, heads, seqlen, dtype=torch.float32)


@kernel_op("coda::flash4_attention_backward", device_type=None)
def flash4_attention_backward(
    dout: torch.Tensor, qkv: list[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, n_heads: int
) -> list[torch.Tensor]:
    """The gradient of each tensor of ``qkv``: ``[dqkv]``, whose three head ranges
    the kernel writes as dq, dk and dv, or ``[dq, dk, dv]``."""
    grads = _gradient_buffers(qkv)
    q, k, v = _kernel_heads(qkv, n_heads)
    dq, dk, dv = split_heads(grads, n_heads)
    flash4_interface()._flash_attn_bwd(
        q, k, v, out, dout, lse, softmax_scale=q.shape[-1] ** -0.5, causal=True,
        dq=dq, dk=dk, dv=dv,
    )
    return grads


@flash4_attention_backward.register_fake
def _(dout, qkv, out, lse, n_heads):
    return _gradient_buffers(qkv)


def _setup_context(ctx, inputs, output):
    qkv, n_heads = inputs
    out, lse = output
    ctx.save_for_backward(*qkv, out, lse)
    ctx.n_heads = n_heads
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    *qkv, out, lse = ctx.saved_tensors
    return flash4_attention_backward(dout, qkv, out, lse, ctx.n_heads), None


flash4_attention.register_autograd(_backward, setup_context=_setup_context)

# TorchTitan's selective op AC (llama3's parallelize, which the coda_llama3 spec
# uses) saves the outputs of the ops in this set, its attention ops among them,
# and reads it at every forward: ours is saved the same way.
_op_sac_save_list.add(torch.ops.coda.flash4_attention.default)


def packed_attention(
    attention: Attention, qkv: list[torch.Tensor], attention_masks, *, strict: bool = False
) -> torch.Tensor:
    """flash4 in place of ``..packed_attention`` (TorchTitan's causal SDPA), same
    arguments and (B, S, Hq * D) result; inputs the kernel cannot take (not CUDA,
    not bf16) run the reference, reported once (``..fallback``), or raise if ``strict``."""
    assert attention_masks is None, "flash4 computes TorchTitan's causal 'sdpa' attention"
    reason = _unsupported_reason(qkv)
    if reason is not None:
        report_fallback("flash4 attention", reason, strict)
        return reference(attention, qkv, attention_masks)
    out, _ = flash4_attention(qkv, attention.n_heads)
    return out.flatten(2)
