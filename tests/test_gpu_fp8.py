"""FP8 kernels (tensorwise, delayed) against the FP8 reference on an SM90 GPU (pytest -m gpu).

Fresh random bf16 inputs at odd M and the 1B/8B dims, outputs allocated from
memory poisoned with NaN. Every output and input gradient of each fused op is
compared with the float64 run of the unquantized math ("truth"): the kernel's
relative error must stay within the FP8 tolerance and within 1.25x the FP8
reference's own error plus 1e-2 (the kernel and the reference quantize the
same operands, ``r * dz`` and ``x`` in the backward, but round and order their
sums differently; the kernels' forward and dgrad GEMMs accumulate fast).
"""

import copy

import pytest
import torch

from coda_titan.config import Coda
from coda_titan.kernels import FP8_REFERENCE, REFERENCE, ops_for, prepared_weights
from coda_titan.layers import CodaTransformerBlock

from .conftest import block_step, rel_err
from .test_gpu_kernels import (  # noqa: F401 (gpu_only: a fixture)
    QKV_SHAPES, converted_block, gpu_only, poison_allocator, qkv_rope_inputs, run)

pytest.importorskip("quack")
pytestmark = pytest.mark.gpu

FP8_TOL = 0.15
DEV, BF = "cuda", torch.bfloat16


def compare(named, tol=FP8_TOL):
    """named: {name: (kernel, fp8 reference, truth)}; returns {name: (err_k, err_r)}."""
    errors = {}
    for name, (k, r, t) in named.items():
        assert torch.isfinite(k).all(), f"{name}: NaN/inf (unwritten or overflowed output)"
        err_k, err_r = rel_err(k, t), rel_err(r, t)
        assert err_k <= tol and err_k <= 1.25 * err_r + 1e-2, (name, err_k, err_r)
        errors[name] = (round(err_k, 4), round(err_r, 4))
    print(errors)
    return errors


def check(op, inputs, grad_outs, *args, tol=FP8_TOL, recipe="tensorwise", history=None):
    """``op``'s kernel (FP8), FP8 reference and float64 bf16-reference results;
    with a block's amax ``history``, kernel and reference each start from a copy
    of it, and the copies they leave must agree."""
    copies = {}

    def fn(ops):
        kwargs = {} if history is None else {"history": copies.setdefault(id(ops), history.clone())}
        return lambda *xs: getattr(ops, op)(*xs, *args, **kwargs)

    kernel, reference = ops_for("cutedsl", strict=True, fp8=recipe), FP8_REFERENCE[recipe]
    k_out, k_grads = run(fn(kernel), inputs, grad_outs)
    r_out, r_grads = run(fn(reference), inputs, grad_outs)
    if history is not None:
        recorded = copies[id(kernel)][:, 0] > 0
        assert recorded.any()
        assert torch.equal(recorded, copies[id(reference)][:, 0] > 0)
        torch.testing.assert_close(copies[id(kernel)], copies[id(reference)], rtol=2e-2, atol=0)
    t_out, t_grads = run(fn(REFERENCE), [t.double() for t in inputs],
                         [g.double() for g in grad_outs])
    named = {f"out{i}": v for i, v in enumerate(zip(k_out, r_out, t_out))}
    named |= {f"grad{i}": v for i, v in enumerate(zip(k_grads, r_grads, t_grads))}
    return compare(named, tol)


@pytest.mark.parametrize("m,n", [(1531, 256), (4096, 2048), (2053, 4096)])
@pytest.mark.parametrize("kind", ["act", "grad"])
@pytest.mark.parametrize("rows,cols", [(True, True), (True, False), (False, True)])
def test_fp8_quantize_matches_the_reference(m, n, kind, rows, cols):
    """The Triton cast, in each orientation it is asked for: equal to ``fp8.quantize``
    (tensorwise) but for a rare one-step rounding difference where the scale's
    division rounds differently; the transposed copy's padding columns zero, in
    poisoned memory; ``dq``, the GEMM's dequantization, the other operand's
    ``1 / scale`` over this one's scale."""
    from coda_titan.kernels import fp8
    from coda_titan.kernels.cutedsl import fp8_operands

    torch.manual_seed(m)
    x = torch.randn(m, n, device=DEV, dtype=BF) * 3
    x[:, 5] *= 1e4
    want, scale = fp8.quantize(x, kind, "tensorwise")
    other = torch.rand(1, device=DEV) + 1e-3
    poison_allocator()
    got = fp8_operands.quantize(x, kind, rows=rows, cols=cols, times=other if rows else None)
    assert (got.dq is None) != rows
    if rows:
        torch.testing.assert_close(got.dq, other / scale.reshape(1))
    assert (got.rows is None) != rows and (got.cols is None) != cols
    for q in ([got.rows] if rows else []) + ([got.cols[:, :m].t()] if cols else []):
        steps = (q.view(torch.uint8).int() - want.view(torch.uint8).int()).abs()
        assert steps.max() <= 1 and (steps > 0).float().mean() < 1e-4
    if cols:
        assert got.cols.shape[1] % 16 == 0 and not got.cols[:, m:].view(torch.uint8).any()
    torch.testing.assert_close(got.inv_scale * scale.reshape(1), torch.ones(1, device=DEV))


@pytest.mark.parametrize("rows_each,interleave", [((2048, 512, 512), False), ((1040, 272, 272), False),
                                                  ((1536, 1536), True), ((4096,), False)])
@pytest.mark.parametrize("fold", [True, False])
def test_fp8_stacked_weight_cast_matches_the_reference(rows_each, interleave, fold):
    """The weight cast that stacks the projections and folds the norm weight as it
    loads: equal to ``fp8.quantize`` of the stacked, folded bf16 weight (but for
    a rare one-step rounding difference), its transposed copy exact, in poisoned memory."""
    from coda_titan.kernels import fp8
    from coda_titan.kernels.cutedsl import fp8_operands
    from coda_titan.kernels.cutedsl.gemm import stack_rows
    from coda_titan.kernels.deferred_rmsnorm import fold_norm_weight

    torch.manual_seed(len(rows_each))
    weights = [torch.randn(r, 2048, device=DEV, dtype=BF) * (i + 1) for i, r in enumerate(rows_each)]
    g = (torch.rand(2048, device=DEV) + 0.5).to(BF) if fold else None
    stacked = stack_rows(weights, interleave)
    want, scale = fp8.quantize(stacked if g is None else fold_norm_weight(stacked, g), "weight",
                               "tensorwise")
    poison_allocator()
    got = fp8_operands.quantize_stacked(weights, g, interleave)
    steps = (got.rows.view(torch.uint8).int() - want.view(torch.uint8).int()).abs()
    assert steps.max() <= 1 and (steps > 0).float().mean() < 1e-4
    torch.testing.assert_close(got.inv_scale * scale.reshape(1), torch.ones(1, device=DEV))
    cols = fp8_operands.quantize_stacked(weights, g, interleave, rows=False, cols=True)
    assert torch.equal(cols.cols.view(torch.uint8), got.rows.t().contiguous().view(torch.uint8))


def test_fp8_stacked_weight_cast_rejects_what_it_cannot_stack():
    from coda_titan.kernels.cutedsl import fp8_operands

    w = torch.randn(64, 64, device=DEV, dtype=BF)
    with pytest.raises(ValueError, match="one to three, equal in rows when interleaved"):
        fp8_operands.quantize_stacked([w, w[:32]], None, True)
    for count in (0, 4):
        with pytest.raises(ValueError, match="one to three"):
            fp8_operands.quantize_stacked([w] * count, None, False)
    for weights, g in (([w, w[:, :32]], None), ([w, w.float()], None), ([w], w[0, :32])):
        with pytest.raises(ValueError, match="same columns and dtype, the norm weight one entry"):
            fp8_operands.quantize_stacked(weights, g, False)


@pytest.mark.parametrize("rows_each,interleave,fold", [((1040, 272, 272), False, True),
                                                       ((1536, 1536), True, True),
                                                       ((4096,), False, False)])
def test_fp8_grouped_weight_cast_equals_each_weights_own_cast(rows_each, interleave, fold):
    """Three layers' weights cast in one group (the model's pre-forward build):
    each bit for bit the stacked cast of its own, in poisoned memory, though one
    layer has an outlier (its own scale)."""
    from coda_titan.kernels.cutedsl import fp8_operands

    torch.manual_seed(len(rows_each))
    stacks = [([torch.randn(r, 2048, device=DEV, dtype=BF) for r in rows_each],
               (torch.rand(2048, device=DEV) + 0.5).to(BF) if fold else None) for _ in range(3)]
    stacks[1][0][-1][5, 7] = 300.0
    want = [fp8_operands.quantize_stacked(w, g, interleave) for w, g in stacks]
    poison_allocator()
    got = fp8_operands.quantize_stacked_group(stacks, interleave)
    assert len({o.inv_scale.item() for o in got}) == 3
    for o, w in zip(got, want):
        assert torch.equal(o.rows.view(torch.uint8), w.rows.view(torch.uint8))
        assert torch.equal(o.inv_scale, w.inv_scale) and o.cols is None
        assert o.inv_scale.data_ptr() % 16 == 0  # as cuBLAS takes a scale


def test_fp8_grouped_weight_cast_rejects_mixed_layouts():
    from coda_titan.kernels.cutedsl import fp8_operands

    w = torch.randn(64, 64, device=DEV, dtype=BF)
    g = torch.ones(64, device=DEV, dtype=BF)
    for stacks in ([([w], None), ([w[:32]], None)], [([w], g), ([w], None)],
                   [([w.float()], None)], [([w.t()], None)],
                   [([torch.randn(4200, device=DEV, dtype=BF)[4:4100].view(64, 64)], None)]):
        with pytest.raises(ValueError, match="must be one layout, contiguous bfloat16, 16-byte"):
            fp8_operands.quantize_stacked_group(stacks, False)


def mlp_inputs(m, d, f, outlier=None):
    h = torch.randn(m, d, device=DEV, dtype=BF)
    if outlier is not None:
        h[:, 3] *= outlier
        h[::97] *= outlier / 10
    g = (torch.rand(d, device=DEV) + 0.5).to(BF)
    w1, w3 = (torch.randn(f, d, device=DEV, dtype=BF) * d**-0.5 for _ in range(2))
    w2 = torch.randn(d, f, device=DEV, dtype=BF) * f**-0.5
    return [h, g, w1, w3, w2]


@pytest.mark.parametrize("m,d,f", [(1531, 256, 512), (4096, 2048, 8192), (2053, 4096, 14336)])
def test_fp8_rmsnorm_swiglu_mlp_kernel(m, d, f):
    torch.manual_seed(m)
    check("rmsnorm_swiglu_mlp", mlp_inputs(m, d, f), [torch.randn(m, d, device=DEV, dtype=BF)],
          1e-5)


@pytest.mark.parametrize("m,d,k", [(1531, 256, 256), (4096, 2048, 2048), (2053, 4096, 4096)])
def test_fp8_linear_residual_sumsq_kernel(m, d, k):
    torch.manual_seed(m + 1)
    x = torch.randn(m, d, device=DEV, dtype=BF)
    o = torch.randn(m, k, device=DEV, dtype=BF)
    w = torch.randn(d, k, device=DEV, dtype=BF) * k**-0.5
    check("linear_residual_sumsq", [x, o, w], [torch.randn(m, d, device=DEV, dtype=BF)])


@pytest.mark.parametrize("batch,seqlen,d,hq,hkv", QKV_SHAPES)
def test_fp8_rmsnorm_qkv_rope_kernel(batch, seqlen, d, hq, hkv):
    inputs, freqs_cis, positions, grads = qkv_rope_inputs(batch, seqlen, d, hq, hkv)
    check("rmsnorm_qkv_rope", inputs, grads, freqs_cis, positions, 1e-5)


def test_fp8_outlier_channels_stay_finite():
    """A channel 1e4 times the others and every 97th row 1e3 times (rows change ``r``,
    so they test that the kernel quantizes ``r * dz`` as the reference does) in the
    input, a channel 1e4 times in the output gradient: one tensorwise scale then
    flushes the small values of those tensors (both the kernel and the reference
    lose them), but nothing overflows: results are finite, and within 1.25x the
    FP8 reference's error from the truth plus 1e-2."""
    torch.manual_seed(5)
    m, d, f = 1531, 2048, 8192
    grad = torch.randn(m, d, device=DEV, dtype=BF)
    grad[:, 11] *= 1e4
    check("rmsnorm_swiglu_mlp", mlp_inputs(m, d, f, outlier=1e4), [grad], 1e-5, tol=1.0)


def test_fp8_block_compiles_fullgraph_under_full_ac_and_releases_kept_weights():
    """A converted FP8 block under torch.compile(fullgraph=True), with and without
    full AC, matches the eager FP8 block (strict: no op may fall back); a forward
    keeps the block's four FP8 weights, and their last readers (the dgrads)
    release them by the end of each step."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    eager, freqs, x, grad = converted_block("debugmodel_gqa", 512, 12)
    CodaTransformerBlock.convert(eager, Coda(fp8="coda", backend="cutedsl"), "cutedsl",
                                 keep_weights=True)
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    checkpointed = torch.compile(
        checkpoint_wrapper(copy.deepcopy(eager), preserve_rng_state=False), fullgraph=True)
    eager(x, freqs, None)
    assert prepared_weights.count() == 4  # wq/wk/wv, wo, w1/w3, w2: kept for the backward
    prepared_weights.clear()
    want = block_step(eager, x, freqs, grad)
    assert prepared_weights.count() == 0
    for module in (compiled, checkpointed):
        got = block_step(module, x, freqs, grad)
        assert prepared_weights.count() == 0
        assert rel_err(got[0], want[0]) < 1e-2
        assert rel_err(got[1], want[1]) < 1e-2


@pytest.mark.parametrize("kind", ["act", "grad"])
@pytest.mark.parametrize("past", [0.25, 4.0])
def test_fp8_delayed_cast_matches_the_reference(kind, past):
    """The delayed Triton cast scales from the history's past amaxes (``past`` times
    the tensor's own: a quarter saturates, four times wastes range) as the
    reference does, records the exact current amax, and stays finite."""
    from coda_titan.kernels import fp8
    from coda_titan.kernels.cutedsl import fp8_operands

    torch.manual_seed(3)
    m, n = 2053, 4096
    x = torch.randn(m, n, device=DEV, dtype=BF)
    x[:, 7] *= 1e3
    amax = x.abs().max().float()
    history = torch.zeros(1 + fp8.HISTORY, device=DEV)
    history[3] = amax * past
    history[5] = amax * past / 2
    ref_history = history.clone()
    want, _ = fp8.quantize(x, kind, "delayed", ref_history)
    poison_allocator()
    got = fp8_operands.quantize(x, kind, "delayed", history, rows=True, cols=True)
    for q in (got.rows, got.cols[:, :m].t()):
        assert not torch.isinf(q.float()).any() and not torch.isnan(q.float()).any()
        steps = (q.view(torch.uint8).int() - want.view(torch.uint8).int()).abs()
        assert steps.max() <= 1 and (steps > 0).float().mean() < 1e-4
    assert history[0] == amax and ref_history[0] == amax
    torch.testing.assert_close(got.inv_scale, (amax * past / torch.finfo(want.dtype).max).reshape(1))


def test_fp8_tensorwise_cast_records_its_amax():
    from coda_titan.kernels import fp8
    from coda_titan.kernels.cutedsl import fp8_operands

    x = torch.randn(1531, 2048, device=DEV, dtype=BF) * 5
    history = torch.zeros(1 + fp8.HISTORY, device=DEV)
    history[0] = 1.0
    fp8_operands.quantize(x, "act", "tensorwise", history, rows=False, cols=True)
    assert history[0] == x.abs().max().float() and not history[1:].any()


def filled_history(seed):
    """A block's amax history with past amaxes around those of the test inputs."""
    from coda_titan.kernels import fp8

    gen = torch.Generator(device=DEV).manual_seed(seed)
    history = torch.zeros(fp8.HISTORY_SITES, 1 + fp8.HISTORY, device=DEV)
    history[:, 1:] = torch.rand(fp8.HISTORY_SITES, fp8.HISTORY, device=DEV, generator=gen) * 8
    return history


@pytest.mark.parametrize("m,d,f", [(1531, 256, 512), (4096, 2048, 8192)])
def test_fp8_delayed_rmsnorm_swiglu_mlp_kernel(m, d, f):
    torch.manual_seed(m)
    check("rmsnorm_swiglu_mlp", mlp_inputs(m, d, f), [torch.randn(m, d, device=DEV, dtype=BF)],
          1e-5, recipe="delayed", history=filled_history(m))


def test_fp8_delayed_linear_residual_sumsq_kernel():
    torch.manual_seed(7)
    m, d, k = 2053, 4096, 4096
    x, o = torch.randn(m, d, device=DEV, dtype=BF), torch.randn(m, k, device=DEV, dtype=BF)
    w = torch.randn(d, k, device=DEV, dtype=BF) * k**-0.5
    check("linear_residual_sumsq", [x, o, w], [torch.randn(m, d, device=DEV, dtype=BF)],
          recipe="delayed", history=filled_history(m))


@pytest.mark.parametrize("batch,seqlen,d,hq,hkv", QKV_SHAPES[:2])
def test_fp8_delayed_rmsnorm_qkv_rope_kernel(batch, seqlen, d, hq, hkv):
    inputs, freqs_cis, positions, grads = qkv_rope_inputs(batch, seqlen, d, hq, hkv)
    check("rmsnorm_qkv_rope", inputs, grads, freqs_cis, positions, 1e-5, recipe="delayed",
          history=filled_history(seqlen))


def test_fp8_delayed_block_compiles_under_full_ac_and_steps_its_history():
    """A delayed-recipe block: its first step scales from the current amaxes and
    fills the history; after ``DelayedScaling.step`` the compiled, checkpointed
    block scales from it (every operand recorded: no write lost to a copy under
    compile), matching the eager block from the same history."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from coda_titan.layers.delayed_scaling import DelayedScaling

    eager, freqs, x, grad = converted_block("debugmodel_gqa", 512, 13)
    CodaTransformerBlock.convert(eager, Coda(fp8="coda", fp8_recipe="delayed", backend="cutedsl"),
                                 "cutedsl", keep_weights=True)
    eager.fp8_amax_history.zero_()
    assert eager.fp8_recipe()[0] == "tensorwise"
    block_step(eager, x, freqs, grad)
    assert (eager.fp8_amax_history[:, 0] > 0).all()
    DelayedScaling().step(eager)
    assert eager.fp8_recipe()[0] == "delayed" and not eager.fp8_amax_history[:, 0].any()
    checkpointed = checkpoint_wrapper(copy.deepcopy(eager), preserve_rng_state=False)
    compiled = torch.compile(checkpointed, fullgraph=True)
    want = block_step(eager, x, freqs, grad)
    got = block_step(compiled, x, freqs, grad)
    inner = checkpointed._checkpoint_wrapped_module
    assert (inner.fp8_amax_history[:, 0] > 0).all()
    torch.testing.assert_close(inner.fp8_amax_history, eager.fp8_amax_history, rtol=1e-2, atol=0)
    assert rel_err(got[0], want[0]) < 1e-2
    assert rel_err(got[1], want[1]) < 1e-2


@pytest.mark.parametrize("keep", [True, False])
def test_fp8_weight_keeps_one_orientation_and_the_dgrad_gets_the_other(keep):
    """The forward's FP8 weight (rows) is kept alone; the dgrad's (cols) is its exact
    transpose, from the kept copy or cast afresh, with the same scale."""
    from coda_titan.kernels.cutedsl import fp8_operands

    torch.manual_seed(8)
    w1, w3 = (torch.randn(1536, 2048, device=DEV, dtype=BF) for _ in range(2))
    g = (torch.rand(2048, device=DEV) + 0.5).to(BF)
    prepared_weights.clear()
    fwd = fp8_operands.weight([w1, w3], g, True, keep)
    assert fwd.cols is None and prepared_weights.count() == int(keep)
    poison_allocator()
    dgrad = fp8_operands.weight([w1, w3], g, True, last=True)
    assert dgrad.rows is None and prepared_weights.count() == 0
    assert torch.equal(dgrad.cols.view(torch.uint8), fwd.rows.t().contiguous().view(torch.uint8))
    assert torch.equal(dgrad.inv_scale, fwd.inv_scale)
