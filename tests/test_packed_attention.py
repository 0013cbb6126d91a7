"""The attention core on the packed QKV, on the CPU.

The reference (TorchTitan's SDPA path on views of the packed tensor) against
the attention math in float64, forward and the packed gradient. The flash4
custom op with flash-attn-4's two entry points emulated in float64 PyTorch
(the backward from the formula in ``packed_attention``'s docstring, writing
into the buffers it is handed): what the op gives the kernel (views of one
dQKV buffer), what it returns, and how it behaves in a converted block under
torch.compile(fullgraph=True) and full / selective activation checkpointing.
The kernel itself is tested on the GPU (``test_gpu_attention.py``).
"""

import copy
import warnings

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torchtitan.config.job_config import ActivationCheckpoint
from torchtitan.distributed.activation_checkpoint import _apply_ac_to_transformer_block
from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.models.llama3.model.model import TransformerBlock

from coda_titan.config import Coda
from coda_titan.kernels import attention_for, fallback, packed_attention
from coda_titan.kernels.flash4 import packed_attention as flash4
from coda_titan.kernels.packed_attention import split_heads
from coda_titan.layers import CodaTransformerBlock

from .conftest import block_step, rel_err, titan_attention

# (batch, seqlen, query heads, key/value heads, head dim): GQA and MHA, odd lengths.
SHAPES = [(2, 7, 4, 2, 8), (1, 13, 3, 3, 16), (3, 5, 8, 1, 4)]


def attention_math(q, k, v, scale):
    """(out, lse) of causal softmax attention with GQA, written out."""
    group = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
    seqlen = q.shape[1]
    scores = torch.einsum("bshd,bthd->bhst", q, k) * scale
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    lse = scores.logsumexp(-1)
    out = torch.einsum("bhst,bthd->bshd", (scores - lse[..., None]).exp(), v)
    return out, lse


class EmulatedFlash4:
    """flash-attn-4's ``_flash_attn_fwd`` / ``_flash_attn_bwd`` as the op calls them,
    in PyTorch: the backward from the lse (module docstring of ``packed_attention``),
    written into the dq/dk/dv it is given."""

    def __init__(self):
        self.forward_calls = 0
        self.gradient_buffers = None

    def _flash_attn_fwd(self, q, k, v, softmax_scale, causal, return_lse):
        assert causal and return_lse
        assert all(flash4._layout_reason(t) is None for t in (q, k, v))
        self.forward_calls += 1
        out, lse = attention_math(q, k, v, softmax_scale)
        # Fresh contiguous tensors, as the kernel allocates them (the fake impl's layout).
        return out.contiguous(), lse.float(), None, None, None

    def _flash_attn_bwd(self, q, k, v, out, dout, lse, softmax_scale, causal, dq, dk, dv):
        assert causal
        assert all(flash4._layout_reason(t) is None for t in (q, k, v, dq, dk, dv))
        group = q.shape[2] // k.shape[2]
        kr, vr = (t.repeat_interleave(group, dim=2) for t in (k, v))
        seqlen = q.shape[1]
        causal_mask = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
        scores = torch.einsum("bshd,bthd->bhst", q, kr) * softmax_scale
        p = (scores - lse.to(q.dtype)[..., None]).exp().masked_fill(~causal_mask, 0)
        dp = torch.einsum("bshd,bthd->bhst", dout, vr)
        delta = (dout * out).sum(-1).transpose(1, 2)
        ds = p * (dp - delta[..., None])
        dq.copy_(softmax_scale * torch.einsum("bhst,bthd->bshd", ds, kr))
        per_head_dk = softmax_scale * torch.einsum("bhst,bshd->bthd", ds, q)
        per_head_dv = torch.einsum("bhst,bshd->bthd", p, dout)
        dk.copy_(per_head_dk.unflatten(2, (k.shape[2], group)).sum(3))
        dv.copy_(per_head_dv.unflatten(2, (k.shape[2], group)).sum(3))
        self.gradient_buffers = (dq, dk, dv)
        return dq, dk, dv


@pytest.fixture
def emulated_flash4(monkeypatch):
    """The flash4 op on any device, with the emulated kernel."""
    kernel = EmulatedFlash4()
    monkeypatch.setattr(flash4, "flash4_interface", lambda: kernel)
    monkeypatch.setattr(flash4, "_unsupported_reason", lambda qkv: None)
    return kernel


def packed_inputs(batch, seqlen, hq, hkv, hd, seed=0):
    torch.manual_seed(seed)
    qkv = torch.randn(batch, seqlen, hq + 2 * hkv, hd, dtype=torch.float64)
    return qkv, torch.randn(batch, seqlen, hq, hd, dtype=torch.float64)


def truth(qkv, hq, dout):
    """out and d(out . dout)/d(qkv) from the written-out math, float64."""
    qkv = qkv.detach().clone().requires_grad_()
    out, _ = attention_math(*split_heads([qkv], hq), qkv.shape[-1] ** -0.5)
    out.backward(dout)
    return out, qkv.grad


@pytest.mark.parametrize("shape", SHAPES)
def test_packed_reference_matches_attention_math_float64(shape):
    batch, seqlen, hq, hkv, hd = shape
    qkv, dout = packed_inputs(*shape)
    attention = titan_attention(hq, hkv, hd)
    want_out, want_grad = truth(qkv, hq, dout)
    packed = qkv.clone().requires_grad_()
    out = packed_attention(attention, [packed], None)
    out.backward(dout.flatten(2))
    assert out.shape == (batch, seqlen, hq * hd)
    assert rel_err(out, want_out.flatten(2)) < 1e-12
    assert rel_err(packed.grad, want_grad) < 1e-12
    separate = [t.detach().clone().requires_grad_() for t in qkv.split((hq, hkv, hkv), dim=2)]
    out_separate = packed_attention(attention, separate, None)
    out_separate.backward(dout.flatten(2))
    assert torch.equal(out_separate, out)
    assert rel_err(torch.cat([t.grad for t in separate], dim=2), want_grad) < 1e-12


def test_split_heads_rejects_a_packing_that_does_not_fit():
    with pytest.raises(ValueError, match="does not hold 4 query heads"):
        packed_attention(titan_attention(4, 2, 8), [torch.randn(1, 3, 7, 8)], None)


@pytest.mark.parametrize("shape", SHAPES)
def test_flash4_op_hands_the_kernel_views_of_one_dqkv_buffer(emulated_flash4, shape):
    batch, seqlen, hq, hkv, hd = shape
    qkv, dout = packed_inputs(*shape, seed=1)
    want_out, want_grad = truth(qkv, hq, dout)
    # As in the block: the (M, N) output of the QKV+RoPE op, viewed as heads.
    rows = qkv.flatten(2).flatten(0, 1).clone().requires_grad_()
    out, lse = flash4.flash4_attention([rows.view_as(qkv)], hq)
    assert lse.shape == (batch, hq, seqlen) and lse.dtype == torch.float32
    assert not lse.requires_grad
    out.backward(dout)
    assert rel_err(out, want_out) < 1e-12
    assert rel_err(rows.grad.view_as(qkv), want_grad) < 1e-6  # the lse is float32, as the kernel's
    # The gradient that reaches the QKV+RoPE op is the buffer the kernel wrote, whole.
    dq, dk, dv = emulated_flash4.gradient_buffers
    storage = rows.grad.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == storage for t in (dq, dk, dv))
    head = hd * rows.grad.element_size()
    assert [t.data_ptr() - rows.grad.data_ptr() for t in (dq, dk, dv)] == [
        0, hq * head, (hq + hkv) * head]


def test_flash4_op_on_separate_projections(emulated_flash4):
    batch, seqlen, hq, hkv, hd = SHAPES[0]
    qkv, dout = packed_inputs(*SHAPES[0], seed=2)
    want_out, want_grad = truth(qkv, hq, dout)
    separate = [t.contiguous().requires_grad_() for t in qkv.split((hq, hkv, hkv), dim=2)]
    out, _ = flash4.flash4_attention(separate, hq)
    out.backward(dout)
    assert rel_err(out, want_out) < 1e-12
    assert rel_err(torch.cat([t.grad for t in separate], dim=2), want_grad) < 1e-6


def test_flash4_op_copies_a_misaligned_qkv_with_one_warning(emulated_flash4):
    batch, seqlen, hq, hkv, hd = SHAPES[0]
    qkv, dout = packed_inputs(*SHAPES[0], seed=3)
    want_out, want_grad = truth(qkv, hq, dout)
    flash4._warned.clear()
    # One float64 element in: the data is 8-byte, not 16-byte, aligned.
    storage = torch.empty(qkv.numel() + 1, dtype=torch.float64)
    packed = storage[1:].view_as(qkv).copy_(qkv).requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = flash4.flash4_attention([packed], hq)
        out.backward(dout)
    messages = [str(c.message) for c in caught if "flash4" in str(c.message)]
    assert messages == ["coda_titan flash4 attention: QKV copied to a contiguous tensor "
                        "(data not 16-byte aligned)"]
    assert rel_err(out, want_out) < 1e-12
    assert rel_err(packed.grad, want_grad) < 1e-6


def test_flash4_falls_back_to_the_reference_on_cpu_tensors(caplog):
    attention = titan_attention(4, 2, 8)
    qkv, _ = packed_inputs(1, 5, 4, 2, 8)
    fallback._reported.clear()
    out = attention_for("flash4")(attention, [qkv], None)
    assert "CODA flash4 attention: kernel skipped (tensor not on a CUDA device)" in caplog.text
    assert torch.equal(out, packed_attention(attention, [qkv], None))


def block_pair(coda, seed=4):
    torch.manual_seed(seed)
    args = TransformerModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=128,
                                multiple_of=32, rope_theta=500000)
    titan = TransformerBlock(1, args).to(torch.float64)
    with torch.no_grad():
        for p in titan.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    fused = CodaTransformerBlock.convert(copy.deepcopy(titan), coda, "reference", "flash4")
    return titan, fused


FLASH4_BLOCKS = pytest.mark.parametrize(
    "coda", [Coda(), Coda(fuse_norm_qkv_rope=False)], ids=["packed", "separate"])


def block_inputs():
    from torchtitan.models.llama3.model.model import precompute_freqs_cis

    freqs = precompute_freqs_cis(8, 32, 500000.0).to(torch.complex128)
    x = torch.randn(2, 9, 64, dtype=torch.float64)
    return x, freqs, torch.randn_like(x)


@FLASH4_BLOCKS
def test_block_with_flash4_matches_titan_float64(exact_rope, emulated_flash4, coda):
    """The converted block with flash4 attention (emulated kernel) against TorchTitan's
    block, float64, with the QKV packed and from separate projections."""
    titan, fused = block_pair(coda)
    x, freqs, grad_out = block_inputs()
    want = block_step(titan, x, freqs, grad_out)
    got = block_step(fused, x, freqs, grad_out)
    assert emulated_flash4.forward_calls == 1
    assert rel_err(got[0], want[0]) < 1e-10
    assert rel_err(got[1], want[1]) < 1e-6  # the lse is float32, as the kernel's


@FLASH4_BLOCKS
def test_block_with_flash4_under_compile_and_activation_checkpointing(emulated_flash4, coda):
    """torch.compile(fullgraph=True), full AC and TorchTitan's selective op AC give
    the eager block's results. Full AC runs the attention forward again in the
    backward; selective AC saves its output, as TorchTitan's does for its SDPA ops."""
    _, fused = block_pair(coda)
    assert torch.ops.coda.flash4_attention.default in _op_sac_save_list
    x, freqs, grad_out = block_inputs()
    want = block_step(fused, x, freqs, grad_out)
    selective = ActivationCheckpoint(mode="selective", selective_ac_option="op")
    wrappers = {
        "bare": (lambda block: block, 1),
        "full_ac": (lambda block: checkpoint_wrapper(block, preserve_rng_state=False), 2),
        "selective_ac": (lambda block: _apply_ac_to_transformer_block(
            block, selective, op_sac_save_list=_op_sac_save_list), 1),
    }
    variants = {}
    for name, (wrap, forward_calls) in wrappers.items():
        variants[name] = (wrap(copy.deepcopy(fused)), forward_calls)
        # TorchTitan wraps for AC, then compiles each block.
        variants[f"compiled_{name}"] = (torch.compile(
            wrap(copy.deepcopy(fused)), backend="aot_eager", fullgraph=True), forward_calls)
    for name, (module, forward_calls) in variants.items():
        emulated_flash4.forward_calls = 0
        got = block_step(module, x, freqs, grad_out)
        assert rel_err(got[0], want[0]) < 1e-12, name
        assert rel_err(got[1], want[1]) < 1e-12, name
        assert emulated_flash4.forward_calls == forward_calls, name
