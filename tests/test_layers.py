"""Each fused layer against the TorchTitan modules it replaces.

float64: forward and every gradient within 1e-10 relative (the reparameterized
math is exact; only rounding differs). float32: 1e-5. bfloat16: both the fused
and TorchTitan's block are compared with a float64 run of the same weights;
the fused error must stay within 2e-2 (forward) / 3e-2 (gradients) and within
1.5x TorchTitan's own bf16 error plus 2e-3 (measured: both 0.9-1.7%).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.models.llama3.model.model import TransformerBlock, precompute_freqs_cis

from coda_titan.config import Coda
from coda_titan.kernels import linear_residual_sumsq, rmsnorm_linear_cross_entropy
from coda_titan.layers import CodaTransformerBlock, RMSNormLinearCrossEntropyLoss

from .conftest import rel_err

FUSION_SETS = {
    "all": Coda(),
    "no_qkv": Coda(fuse_norm_qkv_rope=False),
    "no_wo": Coda(fuse_wo_residual=False),
    "no_mlp": Coda(fuse_norm_swiglu_mlp=False),
    "only_mlp": Coda(fuse_norm_qkv_rope=False, fuse_wo_residual=False),
}

# (dim, n_heads, n_kv_heads, batch, seqlen): odd token counts, MHA and GQA.
SHAPES = [(64, 8, 2, 3, 7), (96, 6, 6, 1, 13), (128, 8, 4, 2, 5)]


def make_blocks(dim, n_heads, n_kv_heads, coda, dtype, seed):
    torch.manual_seed(seed)
    args = TransformerModelArgs(
        dim=dim, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads,
        vocab_size=128, multiple_of=32, rope_theta=500000,
    )
    ref = TransformerBlock(1, args).to(torch.float64)
    with torch.no_grad():
        for p in ref.parameters():
            # Norm weights away from 1 so folding them into W is exercised.
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    ref = ref.to(dtype)
    fused = CodaTransformerBlock.convert(copy.deepcopy(ref), coda, "reference")
    return ref, fused


def run_block(block, x, freqs_cis, positions, grad_out):
    x = x.detach().clone().requires_grad_()
    out = block(x, freqs_cis, None, positions)
    out.backward(grad_out)
    grads = {n: p.grad for n, p in block.named_parameters()}
    return out, x.grad, grads


def block_inputs(dim, n_heads, batch, seqlen, dtype, with_positions):
    head_dim = dim // n_heads
    freqs = precompute_freqs_cis(head_dim, 32, 500000.0)
    if dtype == torch.float64:
        freqs = freqs.to(torch.complex128)
    positions = torch.randint(0, 32, (batch, seqlen)) if with_positions else None
    x = torch.randn(batch, seqlen, dim, dtype=dtype)
    return x, freqs, positions


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fusions", list(FUSION_SETS))
def test_block_float64_exact(exact_rope, shape, fusions):
    dim, n_heads, n_kv, batch, seqlen = shape
    ref, fused = make_blocks(dim, n_heads, n_kv, FUSION_SETS[fusions], torch.float64, 0)
    x, freqs, positions = block_inputs(dim, n_heads, batch, seqlen, torch.float64, True)
    grad_out = torch.randn(batch, seqlen, dim, dtype=torch.float64)
    out_r, dx_r, g_r = run_block(ref, x, freqs, positions, grad_out)
    out_f, dx_f, g_f = run_block(fused, x, freqs, positions, grad_out)
    assert rel_err(out_f, out_r) < 1e-10
    assert rel_err(dx_f, dx_r) < 1e-10
    assert g_f.keys() == g_r.keys()
    for name in g_r:
        assert rel_err(g_f[name], g_r[name]) < 1e-10, name


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_block_float32(shape):
    dim, n_heads, n_kv, batch, seqlen = shape
    ref, fused = make_blocks(dim, n_heads, n_kv, Coda(), torch.float32, 1)
    x, freqs, positions = block_inputs(dim, n_heads, batch, seqlen, torch.float32, False)
    grad_out = torch.randn(batch, seqlen, dim)
    out_r, dx_r, g_r = run_block(ref, x, freqs, positions, grad_out)
    out_f, dx_f, g_f = run_block(fused, x, freqs, positions, grad_out)
    assert rel_err(out_f, out_r) < 1e-5
    assert rel_err(dx_f, dx_r) < 1e-5
    for name in g_r:
        assert rel_err(g_f[name], g_r[name]) < 1e-5, name


@pytest.mark.parametrize("shape", SHAPES)
def test_block_bfloat16_vs_float64(exact_rope, shape):
    dim, n_heads, n_kv, batch, seqlen = shape
    truth, _ = make_blocks(dim, n_heads, n_kv, Coda(), torch.float64, 2)
    ref, fused = make_blocks(dim, n_heads, n_kv, Coda(), torch.bfloat16, 2)
    x, freqs, _ = block_inputs(dim, n_heads, batch, seqlen, torch.bfloat16, False)
    grad_out = torch.randn(batch, seqlen, dim, dtype=torch.bfloat16)
    out_t, dx_t, g_t = run_block(
        truth, x.double(), freqs.to(torch.complex128), None, grad_out.double()
    )
    out_r, dx_r, g_r = run_block(ref, x, freqs, None, grad_out)
    out_f, dx_f, g_f = run_block(fused, x, freqs, None, grad_out)
    pairs = [("out", out_f, out_r, out_t, 2e-2), ("dx", dx_f, dx_r, dx_t, 3e-2)]
    pairs += [(n, g_f[n], g_r[n], g_t[n], 3e-2) for n in g_t]
    for name, fused_v, ref_v, truth_v, tol in pairs:
        err_fused, err_titan = rel_err(fused_v, truth_v), rel_err(ref_v, truth_v)
        assert err_fused < tol, (name, err_fused)
        assert err_fused < 1.5 * err_titan + 2e-3, (name, err_fused, err_titan)


def test_block_under_autocast():
    """TorchTitan's single-device AMP: float32 params, bf16 autocast. Both sides
    carry bf16 rounding, so they are compared with each other at 2x bf16 tolerance."""
    ref, fused = make_blocks(64, 8, 2, Coda(), torch.float32, 3)
    x, freqs, _ = block_inputs(64, 8, 2, 9, torch.float32, False)
    grad_out = torch.randn(2, 9, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_r, dx_r, g_r = run_block(ref, x, freqs, None, grad_out)
        out_f, dx_f, g_f = run_block(fused, x, freqs, None, grad_out)
    assert out_f.dtype == out_r.dtype == torch.float32
    assert rel_err(out_f, out_r) < 2e-2
    assert rel_err(dx_f, dx_r) < 4e-2
    for name in g_r:
        assert g_f[name].dtype == torch.float32
        assert rel_err(g_f[name], g_r[name]) < 4e-2, name


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_linear_residual_sumsq(dtype, tol):
    torch.manual_seed(4)
    x = torch.randn(11, 32, dtype=dtype, requires_grad=True)
    o = torch.randn(11, 48, dtype=dtype, requires_grad=True)
    w = torch.randn(32, 48, dtype=dtype, requires_grad=True)
    h, sumsq = linear_residual_sumsq(x, o, w)
    x2, o2, w2 = (t.detach().clone().requires_grad_() for t in (x, o, w))
    h_ref = x2 + o2 @ w2.t()
    assert rel_err(h, h_ref) < tol
    assert rel_err(sumsq, h_ref.square().sum(-1)) < tol
    assert not sumsq.requires_grad
    grad = torch.randn_like(h)
    h.backward(grad)
    h_ref.backward(grad)
    for a, b in ((x, x2), (o, o2), (w, w2)):
        assert rel_err(a.grad, b.grad) < tol


def lm_head_reference(h, norm_weight, weight, labels, eps):
    logits = F.rms_norm(h, (h.shape[-1],), norm_weight, eps) @ weight.t()
    return F.cross_entropy(logits.float() if h.dtype != torch.float64 else logits,
                           labels, reduction="sum", ignore_index=-100)


@pytest.mark.parametrize("tokens,chunk", [(37, 10), (64, 64), (5, 1000)])
def test_lm_head_cross_entropy_float64(tokens, chunk):
    torch.manual_seed(5)
    dim, vocab = 24, 97
    h = torch.randn(tokens, dim, dtype=torch.float64, requires_grad=True)
    g = (torch.rand(dim, dtype=torch.float64) + 0.5).requires_grad_()
    w = torch.randn(vocab, dim, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    labels[::3] = -100
    loss = rmsnorm_linear_cross_entropy(h, g, w, labels, 1e-5, chunk)
    h2, g2, w2 = (t.detach().clone().requires_grad_() for t in (h, g, w))
    ref = lm_head_reference(h2, g2, w2, labels, 1e-5)
    assert rel_err(loss, ref) < 1e-10
    (0.37 * loss).backward()
    (0.37 * ref).backward()
    for a, b in ((h, h2), (g, g2), (w, w2)):
        assert rel_err(a.grad, b.grad) < 1e-10


def test_lm_head_cross_entropy_bfloat16():
    torch.manual_seed(6)
    dim, vocab, tokens = 64, 300, 45
    h = torch.randn(tokens, dim, dtype=torch.bfloat16)
    g = torch.rand(dim, dtype=torch.bfloat16) + 0.5
    w = torch.randn(vocab, dim, dtype=torch.bfloat16) * 0.1
    labels = torch.randint(0, vocab, (tokens,))
    labels[0] = -100
    inputs = [t.clone().requires_grad_() for t in (h, g, w)]
    loss = rmsnorm_linear_cross_entropy(*inputs, labels, 1e-5, 16)
    loss.backward()
    truth_inputs = [t.double().requires_grad_() for t in (h, g, w)]
    truth = lm_head_reference(*truth_inputs, labels, 1e-5)
    truth.backward()
    assert loss.dtype == torch.float32
    assert rel_err(loss, truth) < 1e-3
    for a, b in zip(inputs, truth_inputs):
        assert rel_err(a.grad, b.grad) < 2e-2


def test_standalone_loss_module_matches_titan_head():
    torch.manual_seed(7)
    head = RMSNormLinearCrossEntropyLoss(32, 50, eps=1e-5, backend="reference").double()
    with torch.no_grad():
        head.norm.weight.uniform_(0.5, 1.5)
    h = torch.randn(2, 9, 32, dtype=torch.float64)
    labels = torch.randint(0, 50, (2, 9))
    loss = head(h, labels)
    norm = torch.nn.RMSNorm(32, eps=1e-5).double()
    norm.load_state_dict({"weight": head.norm.weight.detach()})
    logits = norm(h) @ head.output.weight.detach().t()
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    assert rel_err(loss, ref) < 1e-10
    assert set(head.state_dict()) == {"norm.weight", "output.weight"}


def test_block_under_torch_compile_and_activation_checkpointing():
    """TorchTitan compiles each block and may wrap it in activation checkpointing:
    the fused block must trace without graph breaks and give the same gradients."""
    from torch.utils.checkpoint import checkpoint

    ref, fused = make_blocks(64, 8, 2, Coda(), torch.float32, 8)
    x, freqs, _ = block_inputs(64, 8, 2, 9, torch.float32, False)
    grad_out = torch.randn(2, 9, 64)
    compiled = torch.compile(copy.deepcopy(fused), backend="aot_eager", fullgraph=True)
    checkpointed = copy.deepcopy(fused)

    def run_checkpointed(x, freqs, masks, positions):
        return checkpoint(checkpointed, x, freqs, masks, positions, use_reentrant=False)

    out_e, dx_e, g_e = run_block(fused, x, freqs, None, grad_out)
    out_c, dx_c, g_c = run_block(compiled, x, freqs, None, grad_out)
    x_ac = x.detach().clone().requires_grad_()
    out_a = run_checkpointed(x_ac, freqs, None, None)
    out_a.backward(grad_out)
    assert rel_err(out_c, out_e) < 1e-6 and rel_err(dx_c, dx_e) < 1e-6
    assert rel_err(out_a, out_e) < 1e-6 and rel_err(x_ac.grad, dx_e) < 1e-6
    g_c = {name.removeprefix("_orig_mod."): grad for name, grad in g_c.items()}
    for name, p in checkpointed.named_parameters():
        assert rel_err(g_c[name], g_e[name]) < 1e-6, name
        assert rel_err(p.grad, g_e[name]) < 1e-6, name


def test_lm_head_without_autograd_computes_the_loss_only(monkeypatch):
    """Validation runs the loss under no_grad: no gradient work, same loss."""
    import importlib

    # The package re-exports the op function under the module's name.
    lce = importlib.import_module("coda_titan.kernels.rmsnorm_linear_cross_entropy")
    torch.manual_seed(9)
    h, g, w = torch.randn(33, 16), torch.rand(16) + 0.5, torch.randn(40, 16)
    labels = torch.randint(0, 40, (33,))
    expected = rmsnorm_linear_cross_entropy(h, g, w, labels, 1e-5, 8)

    def no_grad_work(*args, **kwargs):
        raise AssertionError("gradient computed without autograd")

    monkeypatch.setattr(lce, "rmsnorm_input_grad", no_grad_work)
    with torch.no_grad():
        loss = rmsnorm_linear_cross_entropy(h.requires_grad_(), g, w, labels, 1e-5, 8)
    assert torch.equal(loss, expected)


def test_lm_head_rejects_labels_out_of_range():
    h, g, w = torch.randn(4, 8), torch.ones(8), torch.randn(10, 8)
    with pytest.raises(RuntimeError, match="labels must be in"):
        rmsnorm_linear_cross_entropy(h, g, w, torch.tensor([1, 2, 10, -100]), 1e-5, 4)
    with pytest.raises(RuntimeError, match="labels must be in"):
        rmsnorm_linear_cross_entropy(h, g, w, torch.tensor([1, -1, 3, 4]), 1e-5, 4)


def test_cutedsl_ops_fall_back_cleanly_on_cpu_even_under_fullgraph_compile(caplog):
    """The kernel module imports without a GPU; unsupported inputs take the
    reference, reported once, in eager and without a graph break under compile."""
    pytest.importorskip("quack")  # the gpu extra, which CPU installs leave out
    from coda_titan.kernels import REFERENCE, fallback
    from coda_titan.kernels.cutedsl import OPS

    x, o, w = torch.randn(6, 16), torch.randn(6, 16), torch.randn(16, 16)
    fallback._reported.clear()
    h, _ = OPS.linear_residual_sumsq(x, o, w)
    assert "CODA linear_residual_sumsq: kernel skipped (tensor not on a CUDA device)" in caplog.text
    assert torch.equal(h, REFERENCE.linear_residual_sumsq(x, o, w)[0])
    ref, fused = make_blocks(64, 8, 2, Coda(), torch.float32, 10)
    CodaTransformerBlock.convert(fused, Coda(), "cutedsl")
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    xb, freqs, _ = block_inputs(64, 8, 2, 5, torch.float32, False)
    assert rel_err(compiled(xb, freqs, None), ref(xb, freqs, None)) < 1e-5
