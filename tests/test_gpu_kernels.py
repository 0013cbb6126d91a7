"""CuTe DSL kernels against the PyTorch reference on an SM90 GPU (pytest -m gpu).

Fresh random bf16 inputs at several shapes (odd M, the 1B/8B dims); outputs and
every gradient compared with a float64 run of the reference math: relative
error <= 1e-2, and within 1.5x the bf16 reference's own error plus 2e-3.
Outputs are allocated from memory poisoned with NaN, so an unwritten element
fails the test.
"""

import copy
import logging

import pytest
import torch
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.models.llama3.model.model import TransformerBlock, precompute_freqs_cis

from coda_titan.config import Coda
from coda_titan.kernels import REFERENCE, fallback, ops_for
from coda_titan.layers import CodaTransformerBlock

from .conftest import block_step, rel_err

# The kernels need quack and CuTe DSL (the gpu extra), which CPU installs leave out.
pytest.importorskip("quack")
from coda_titan.kernels.cutedsl import OPS  # noqa: E402

pytestmark = pytest.mark.gpu

MLP_SHAPES = [(1531, 256, 512), (4096, 2048, 8192), (2053, 4096, 14336)]


@pytest.fixture(autouse=True)
def gpu_only():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an SM90 GPU")


def poison_allocator():
    """Fill the caching allocator's free blocks with NaN: torch.empty reuses them."""
    torch.cuda.synchronize()
    free = torch.cuda.mem_get_info()[0]
    block = torch.full((int(free * 0.5) // 2,), float("nan"), dtype=torch.bfloat16, device="cuda")
    del block


def run(fn, inputs, grad_outs):
    """Outputs and input gradients of fn; grad_outs pair with its first outputs."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    poison_allocator()
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs[: len(grad_outs)], grad_outs)
    return outs, [t.grad for t in inputs if t.requires_grad]


def assert_close_to_truth(name, k, r, t, tol=1e-2):
    """The kernel's k against the float64 truth t: no NaN, relative error <= tol
    and <= 1.5x the bf16 reference r's own error + 2e-3. Returns both errors."""
    assert not torch.isnan(k).any(), f"{name}: NaN (unwritten or invalid output)"
    err_k, err_r = rel_err(k, t), rel_err(r, t)
    assert err_k <= tol and err_k <= 1.5 * err_r + 2e-3, (name, err_k, err_r)
    return err_k, err_r


def converted_block(flavor, seqlen, seed, attention=None):
    """(eager block converted to cutedsl, freqs, x, grad) for a compiled-block test:
    block 0 of ``flavor`` with TorchTitan's init, batch 2 of ``seqlen`` tokens."""
    from coda_titan.train_spec import coda_llama3_args

    torch.manual_seed(seed)
    args = coda_llama3_args[flavor]
    block = TransformerBlock(0, args).to("cuda", torch.bfloat16)
    with torch.no_grad():
        block.init_weights()
    eager = CodaTransformerBlock.convert(block, Coda(), "cutedsl", attention)
    freqs = precompute_freqs_cis(args.dim // args.n_heads, seqlen, args.rope_theta).cuda()
    x = torch.randn(2, seqlen, args.dim, device="cuda", dtype=torch.bfloat16)
    return eager, freqs, x, torch.randn_like(x)


def check(kernel_fn, reference_fn, inputs, grad_outs, tol=1e-2):
    k_out, k_grads = run(kernel_fn, inputs, grad_outs)
    r_out, r_grads = run(reference_fn, inputs, grad_outs)
    t_inputs = [t.double() if t.is_floating_point() else t for t in inputs]
    t_out, t_grads = run(reference_fn, t_inputs, [g.double() for g in grad_outs])
    errors = {}
    for name, k, r, t in [(f"out{i}", *v) for i, v in enumerate(zip(k_out, r_out, t_out))] + [
        (f"grad{i}", *v) for i, v in enumerate(zip(k_grads, r_grads, t_grads))
    ]:
        errors[name] = assert_close_to_truth(name, k, r, t, tol)
    print(errors)
    return errors


@pytest.mark.parametrize("m,d,f", MLP_SHAPES)
def test_rmsnorm_swiglu_mlp_kernel(m, d, f):

    torch.manual_seed(m)
    dev, bf = "cuda", torch.bfloat16
    h = torch.randn(m, d, device=dev, dtype=bf)
    g = (torch.rand(d, device=dev) + 0.5).to(bf)
    w1, w3 = (torch.randn(f, d, device=dev, dtype=bf) * d**-0.5 for _ in range(2))
    w2 = torch.randn(d, f, device=dev, dtype=bf) * f**-0.5
    grad_out = torch.randn(m, d, device=dev, dtype=bf)

    def kernel(h, g, w1, w3, w2):
        return OPS.rmsnorm_swiglu_mlp(h, g, w1, w3, w2, 1e-5)

    def reference(h, g, w1, w3, w2):
        return REFERENCE.rmsnorm_swiglu_mlp(h, g, w1, w3, w2, 1e-5)

    check(kernel, reference, [h, g, w1, w3, w2], [grad_out])


@pytest.mark.parametrize("m,d,k", [(1531, 256, 256), (4096, 2048, 2048), (2053, 4096, 4096)])
def test_linear_residual_sumsq_kernel(m, d, k):

    torch.manual_seed(m + 1)
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(m, d, device=dev, dtype=bf)
    o = torch.randn(m, k, device=dev, dtype=bf)
    w = torch.randn(d, k, device=dev, dtype=bf) * k**-0.5
    grad_out = torch.randn(m, d, device=dev, dtype=bf)
    check(OPS.linear_residual_sumsq, REFERENCE.linear_residual_sumsq, [x, o, w], [grad_out])


@pytest.mark.parametrize("rows,d,interleave", [
    ((14336, 14336), 4096, True),   # 8B W1/W3
    ((2048, 512, 512), 2048, False),  # 1B Wq/Wk/Wv
    ((4096,), 4096, False),  # an LM head's
    ((40, 24, 8), 72, False),  # partial tiles, every stacked source in one
    ((200, 200), 136, True),
])
def test_unfold_grads_kernel(rows, d, interleave):
    """``unfold`` against ``unfold_weight_grads`` in float64, per weight (its
    rows of dW' taken as ``stack_rows`` stacks them), into poisoned outputs."""
    import importlib

    from coda_titan.kernels.deferred_rmsnorm import norm_weight_grad_acc, unfold_weight_grads

    unfold = importlib.import_module("coda_titan.kernels.cutedsl.unfold_grads").unfold
    stack_rows = importlib.import_module("coda_titan.kernels.cutedsl.gemm").stack_rows
    torch.manual_seed(sum(rows) + d)
    dev, bf = "cuda", torch.bfloat16
    weights = [torch.randn(r, d, device=dev, dtype=bf) * d**-0.5 for r in rows]
    g = (torch.rand(d, device=dev) + 0.5).to(bf)
    folded_grad = torch.randn(sum(rows), d, device=dev, dtype=bf)
    poison_allocator()
    *dws, dg = unfold(folded_grad, weights, g, interleave)
    # Each weight's rows of dW', found by stacking row indices as the weights are.
    index = stack_rows([torch.arange(r, device=dev) + sum(rows[:i]) for i, r in enumerate(rows)],
                       interleave)
    parts = [folded_grad[(index >= sum(rows[:i])) & (index < sum(rows[:i + 1]))]
             for i in range(len(rows))]
    truth = [unfold_weight_grads(p.double(), w.double(), g.double())
             for p, w in zip(parts, weights)]
    for i, (dw, p, (t_dw, _)) in enumerate(zip(dws, parts, truth)):
        r_dw = unfold_weight_grads(p, weights[i], g)[0]
        assert torch.equal(dw, r_dw), f"dW{i}: dW' * g rounds once, as the reference does"
        assert_close_to_truth(f"dW{i}", dw, r_dw, t_dw)
    r_dg = sum(norm_weight_grad_acc(p, w) for p, w in zip(parts, weights)).to(bf)
    print(assert_close_to_truth("dg", dg, r_dg, sum(t_dg for _, t_dg in truth)))


def qkv_rope_inputs(batch, seqlen, d, hq, hkv):
    """([x, g, wq, wk, wv], freqs_cis, positions, [grad]) on fresh random values."""
    from coda_titan.kernels import token_positions

    torch.manual_seed(seqlen)
    dev, bf, hd = "cuda", torch.bfloat16, d // hq
    x = torch.randn(batch * seqlen, d, device=dev, dtype=bf)
    g = (torch.rand(d, device=dev) + 0.5).to(bf)
    wq = torch.randn(hq * hd, d, device=dev, dtype=bf) * d**-0.5
    wk, wv = (torch.randn(hkv * hd, d, device=dev, dtype=bf) * d**-0.5 for _ in range(2))
    freqs_cis = precompute_freqs_cis(hd, 8192, 500000.0).to(dev)
    positions = token_positions(batch, seqlen, torch.randint(0, 8192, (batch, seqlen), device=dev),
                                dev)
    grads = [torch.randn(batch * seqlen, (hq + 2 * hkv) * hd, device=dev, dtype=bf)]
    return [x, g, wq, wk, wv], freqs_cis, positions, grads


QKV_SHAPES = [(1, 1531, 256, 4, 2), (2, 2048, 2048, 32, 8), (1, 2053, 4096, 32, 8)]


@pytest.mark.parametrize("batch,seqlen,d,hq,hkv", QKV_SHAPES)
def test_rmsnorm_qkv_rope_kernel(batch, seqlen, d, hq, hkv):
    (x, g, wq, wk, wv), freqs_cis, positions, grads = qkv_rope_inputs(batch, seqlen, d, hq, hkv)

    def kernel(x, g, wq, wk, wv):
        return OPS.rmsnorm_qkv_rope(x, g, wq, wk, wv, freqs_cis, positions, 1e-5)

    def reference(x, g, wq, wk, wv):
        return REFERENCE.rmsnorm_qkv_rope(x, g, wq, wk, wv, freqs_cis, positions, 1e-5)

    check(kernel, reference, [x, g, wq, wk, wv], grads)


@pytest.mark.parametrize("m,d,vocab,chunk", [(1531, 256, 1000, 512), (4096, 2048, 128256, 1024)])
def test_rmsnorm_linear_cross_entropy_kernel(m, d, vocab, chunk):

    torch.manual_seed(m + 2)
    dev, bf = "cuda", torch.bfloat16
    h = torch.randn(m, d, device=dev, dtype=bf)
    g = (torch.rand(d, device=dev) + 0.5).to(bf)
    w = torch.randn(vocab, d, device=dev, dtype=bf) * d**-0.5
    labels = torch.randint(0, vocab, (m,), device=dev)
    labels[::7] = -100

    def kernel(h, g, w):
        return OPS.rmsnorm_linear_cross_entropy(h, g, w, labels, 1e-5, chunk)

    def reference(h, g, w):
        return REFERENCE.rmsnorm_linear_cross_entropy(h, g, w, labels, 1e-5, chunk)

    check(kernel, reference, [h, g, w], [torch.tensor(1.0 / m, device=dev)])


def test_converted_1b_block_matches_reference_path():
    """A LLaMA-3 1B block (dims of the 1B flavor) converted with the cutedsl backend
    (and flash4 attention where installed) against the same block on the reference
    backend with TorchTitan's SDPA, forward and backward, bf16."""

    from coda_titan.train_spec import coda_llama3_args

    torch.manual_seed(11)
    args = coda_llama3_args["1B"]
    block = TransformerBlock(3, args).to("cuda", torch.bfloat16)
    with torch.no_grad():
        block.init_weights()
        block.attention_norm.weight.uniform_(0.5, 1.5)
        block.ffn_norm.weight.uniform_(0.5, 1.5)
    fused = CodaTransformerBlock.convert(copy.deepcopy(block), Coda(), "cutedsl")
    reference = CodaTransformerBlock.convert(copy.deepcopy(block), Coda(), "reference", "sdpa")
    truth = CodaTransformerBlock.convert(copy.deepcopy(block).double(), Coda(), "reference", "sdpa")
    freqs = precompute_freqs_cis(args.dim // args.n_heads, 4096, args.rope_theta).cuda()
    x = torch.randn(2, 2048, args.dim, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    results = {}
    for name, module in (("fused", fused), ("reference", reference), ("truth", truth)):
        xi = x.detach().to(next(module.parameters()).dtype).requires_grad_()
        out = module(xi, freqs, None)
        out.backward(grad.to(out.dtype))
        results[name] = [out, xi.grad] + [p.grad for p in module.parameters()]
    for i, (f, r, t) in enumerate(zip(*results.values())):
        assert_close_to_truth(i, f, r, t)


def test_converted_block_compiles_fullgraph_like_torchtitan():
    """TorchTitan compiles each block with torch.compile(fullgraph=True), after
    wrapping it for activation checkpointing if asked: the kernel path must
    trace without graph breaks and match eager, and under AC recompute only
    what the backward reads: wo + residual, but not w2 + residual (whose
    output the backward never reads), as for TorchTitan's own block."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.profiler import ProfilerActivity, profile

    eager, freqs, x, grad = converted_block("debugmodel_gqa", 512, 12)
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    checkpointed = torch.compile(
        checkpoint_wrapper(copy.deepcopy(eager), preserve_rng_state=False), fullgraph=True)

    def step(module):
        return block_step(module, x, freqs, grad)

    want = step(eager)
    for module in (compiled, checkpointed):
        got = step(module)
        assert rel_err(got[0], want[0]) < 1e-2
        assert rel_err(got[1], want[1]) < 1e-2
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(checkpointed)
        torch.cuda.synchronize()
    def launches(epilogue):
        return sum(e.count for e in prof.key_averages() if f"_{epilogue}_" in e.key)

    assert launches("residual_sumsq_epi") == 2, prof.key_averages()  # wo, its recompute
    assert launches("scaled_residual") == 1, prof.key_averages()  # w2


def test_offset_views_are_aligned_or_fall_back():
    """Labels as an offset view (tokens[:, 1:] with batch 1) and a bf16 operand at an
    odd offset are aligned inside the ops instead of failing in CUTLASS."""

    torch.manual_seed(14)
    h = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    g = torch.ones(256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16) * 0.06
    tokens = torch.randint(0, 1024, (1, 513), device="cuda")
    offset_labels = tokens[:, 1:].reshape(-1)
    assert offset_labels.data_ptr() % 32 != 0
    loss = OPS.rmsnorm_linear_cross_entropy(h, g, w, offset_labels, 1e-5, 128)
    expected = REFERENCE.rmsnorm_linear_cross_entropy(h, g, w, offset_labels.clone(), 1e-5, 128)
    assert rel_err(loss, expected) < 1e-2
    x = torch.randn(4 * 256 + 1, device="cuda", dtype=torch.bfloat16)[1:].view(4, 256)
    w_o = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    h, _ = OPS.linear_residual_sumsq(x, x, w_o)
    assert rel_err(h, REFERENCE.linear_residual_sumsq(x, x, w_o)[0]) < 1e-2


def test_unsupported_inputs_fall_back_once_or_fail_when_strict(caplog):
    fallback._reported.clear()
    x = torch.randn(64, 36, device="cuda")  # fp32 and 36 % 8 != 0
    o = torch.randn(64, 36, device="cuda")
    w = torch.randn(36, 36, device="cuda")
    h, sumsq = OPS.linear_residual_sumsq(x, o, w)
    assert "CODA linear_residual_sumsq: kernel skipped (dtype torch.float32" in caplog.text
    ref_h, ref_sumsq = REFERENCE.linear_residual_sumsq(x, o, w)
    assert torch.equal(h, ref_h) and torch.equal(sumsq, ref_sumsq)
    xb, ob, wb = (t.to(torch.bfloat16) for t in (x, o, w))
    OPS.linear_residual_sumsq(xb, ob, wb)
    assert "(dimension 36 not a multiple of 8)" in caplog.text
    with pytest.raises(RuntimeError, match="dimension 36 not a multiple of 8"):
        ops_for("cutedsl", strict=True).linear_residual_sumsq(xb, ob, wb)


def test_compiled_block_with_an_odd_dim_falls_back_once_per_op(caplog):
    """dim 260 (heads of 130): no kernel can take it; the compiled block runs the
    reference and the log names each op and the reason exactly once; with
    ``backend = "cutedsl"`` it fails with the reason instead."""
    fallback._reported.clear()
    caplog.set_level(logging.WARNING)
    args = TransformerModelArgs(dim=260, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64,
                                multiple_of=32)
    torch.manual_seed(3)
    ref = TransformerBlock(0, args).to("cuda", torch.bfloat16)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.dim() == 1 else 0.0))
    fused = CodaTransformerBlock.convert(copy.deepcopy(ref), Coda(), "cutedsl", "sdpa")
    compiled = torch.compile(fused, fullgraph=True)
    freqs = precompute_freqs_cis(130, 64, 10000.0).to("cuda")
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(2, 33, 260, device="cuda", dtype=torch.bfloat16)
        assert rel_err(compiled(x, freqs, None), ref(x, freqs, None)) < 1e-2
    lines = [r.getMessage() for r in caplog.records if "kernel skipped" in r.getMessage()]
    assert sorted(lines) == [
        f"CODA {op}: kernel skipped (dimension 260 not a multiple of 8); running the PyTorch "
        "reference" for op in ("linear_residual_sumsq", "rmsnorm_qkv_rope", "rmsnorm_swiglu_mlp")]
    strict = CodaTransformerBlock.convert(copy.deepcopy(ref), Coda(backend="cutedsl"), "cutedsl",
                                          "sdpa")
    with pytest.raises(RuntimeError, match=r"rmsnorm_qkv_rope: .*dimension 260 not a multiple"):
        torch.compile(strict, fullgraph=True)(x, freqs, None)


def test_our_kernel_sources_are_in_the_compiled_kernel_cache_fingerprint():
    """quack's disk cache keys a compiled kernel by its compile function's name and
    arguments, under a fingerprint of the sources it is told about: ours must be
    among them, or an edited kernel of ours would load its old build."""
    import quack.cache

    from coda_titan.kernels import cutedsl

    assert cutedsl.KERNEL_SOURCES in quack.cache.EXTRA_SOURCE_DIRS
    assert (cutedsl.KERNEL_SOURCES / "row_kernels.py").is_file()
