"""flash4 attention (flash-attn-4 on the packed QKV) on an SM90 GPU (pytest -m gpu).

Fresh random bf16 inputs at odd sequence lengths, batch > 1, GQA 32/8 and MHA
8/8, head dims 64 and 128: the output and the packed gradient against a float64
run of TorchTitan's SDPA path (relative error <= 1e-2 and within 1.5x the bf16
SDPA's own error plus 2e-3; printed with -s), with memory poisoned with NaN so
an element of dQKV the kernel leaves unwritten fails. The converted block under
torch.compile(fullgraph=True), with and without activation checkpointing,
against eager; the fallback where flash4 cannot run.
"""

import copy
import logging
import warnings

import pytest
import torch
from torchtitan.models.llama3.model.args import TransformerModelArgs

from coda_titan.backend import flash4_unavailable_reason
from coda_titan.config import Coda
from coda_titan.kernels import attention_for, packed_attention
from coda_titan.kernels.packed_attention import split_heads

from .conftest import block_step, rel_err, titan_attention
from .test_gpu_kernels import assert_close_to_truth, converted_block, poison_allocator

pytestmark = pytest.mark.gpu

# (batch, seqlen, query heads, key/value heads, head dim)
SHAPES = [(2, 1531, 32, 8, 64), (2, 1531, 8, 8, 128), (1, 2053, 32, 8, 128), (3, 1000, 8, 8, 64)]


@pytest.fixture(autouse=True)
def flash4_here():
    reason = flash4_unavailable_reason()
    if reason is not None:
        pytest.skip(f"flash4 cannot run here: {reason}")


def run_attention(core, attention, heads, dout, dtype):
    """(out, gradients of ``heads``) of one attention core, its inputs cast to
    ``dtype``, the allocator poisoned before the forward."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in heads]
    poison_allocator()
    out = core(attention, leaves, None)
    out.backward(dout.to(dtype))
    return [out] + [t.grad for t in leaves]


def check_against_sdpa(heads, hq, hkv, hd, dout):
    """flash4 and bf16 SDPA against float64 SDPA: the output and dq, dk, dv (for
    the packed QKV, the three head ranges of its one gradient). Prints the
    relative errors."""
    attention = titan_attention(hq, hkv, hd)
    runs = [run_attention(core, attention, heads, dout, dtype)
            for core, dtype in ((attention_for("flash4"), torch.bfloat16),
                                (packed_attention, torch.bfloat16),
                                (packed_attention, torch.float64))]
    if len(heads) == 1:
        runs = [[out, *split_heads([dqkv], hq)] for out, dqkv in runs]
    errors = {name: assert_close_to_truth(name, *values)
              for name, *values in zip(("out", "dq", "dk", "dv"), *runs)}
    print({name: f"flash4 {e[0]:.2e} (bf16 SDPA {e[1]:.2e})" for name, e in errors.items()})


@pytest.mark.parametrize("batch,seqlen,hq,hkv,hd", SHAPES)
def test_flash4_on_the_packed_qkv_matches_sdpa(batch, seqlen, hq, hkv, hd):
    """The packed QKV as the block hands it over (the (M, N) QKV+RoPE output viewed
    as heads); dQKV is allocated from poisoned memory: an element the kernel
    leaves unwritten is NaN."""
    torch.manual_seed(seqlen + hq + hd)
    rows = torch.randn(batch * seqlen, (hq + 2 * hkv) * hd, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(batch, seqlen, hq * hd, device="cuda", dtype=torch.bfloat16)
    check_against_sdpa([rows.view(batch, seqlen, hq + 2 * hkv, hd)], hq, hkv, hd, dout)


@pytest.mark.parametrize("batch,seqlen,hq,hkv,hd", SHAPES[:2])
def test_flash4_on_separate_projections_matches_sdpa(batch, seqlen, hq, hkv, hd):
    torch.manual_seed(seqlen + 1)
    heads = [torch.randn(batch, seqlen, n, hd, device="cuda", dtype=torch.bfloat16)
             for n in (hq, hkv, hkv)]
    dout = torch.randn(batch, seqlen, hq * hd, device="cuda", dtype=torch.bfloat16)
    check_against_sdpa(heads, hq, hkv, hd, dout)


def test_flash4_copies_a_misaligned_qkv_with_one_warning():
    from coda_titan.kernels.flash4 import packed_attention as flash4

    torch.manual_seed(5)
    batch, seqlen, hq, hkv, hd = 2, 517, 8, 2, 64
    shape = (batch, seqlen, hq + 2 * hkv, hd)
    aligned = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    storage = torch.empty(aligned.numel() + 1, device="cuda", dtype=torch.bfloat16)
    misaligned = storage[1:].view(shape).copy_(aligned)
    dout = torch.randn(batch, seqlen, hq * hd, device="cuda", dtype=torch.bfloat16)
    attention = titan_attention(hq, hkv, hd)
    want = run_attention(attention_for("flash4"), attention, [aligned], dout, torch.bfloat16)
    flash4._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run_attention(attention_for("flash4"), attention, [misaligned], dout, torch.bfloat16)
    assert [str(c.message) for c in caught if "flash4" in str(c.message)] == [
        "coda_titan flash4 attention: QKV copied to a contiguous tensor (data not 16-byte aligned)"]
    assert torch.equal(got[0], want[0])
    assert rel_err(got[1], want[1]) < 1e-3  # GQA dk/dv are summed with atomics


def flash_forward_launches(prof) -> int:
    """Launches of flash-attn-4's forward kernel in a profile (CuTe DSL names a kernel
    after its module and class: flash_fwd_sm90 / FlashAttentionForwardSm90)."""
    names = [(e.key.lower(), e.count) for e in prof.key_averages()]
    return sum(count for name, count in names
               if "flash" in name and ("fwd" in name or "forward" in name)
               and "bwd" not in name and "backward" not in name)


def test_converted_block_with_flash4_compiles_fullgraph_with_and_without_ac():
    """A 1B block converted with flash4 under torch.compile(fullgraph=True), bare,
    with full AC (checkpoint_wrapper) and with TorchTitan's selective op AC,
    matches eager. Full AC runs the attention forward again in the backward (as
    TorchTitan's block recomputes its SDPA); selective AC saves it (as TorchTitan
    saves its SDPA ops)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.profiler import ProfilerActivity, profile
    from torchtitan.config.job_config import ActivationCheckpoint
    from torchtitan.distributed.activation_checkpoint import _apply_ac_to_transformer_block
    from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list

    eager, freqs, x, grad = converted_block("1B", 1024, 12, "flash4")
    selective = ActivationCheckpoint(mode="selective", selective_ac_option="op")
    variants = {
        "compiled": (torch.compile(copy.deepcopy(eager), fullgraph=True), 1),
        "full_ac": (torch.compile(checkpoint_wrapper(copy.deepcopy(eager), preserve_rng_state=False),
                                  fullgraph=True), 2),
        "selective_ac": (torch.compile(_apply_ac_to_transformer_block(
            copy.deepcopy(eager), selective, op_sac_save_list=_op_sac_save_list), fullgraph=True), 1),
    }

    def step(module):
        return block_step(module, x, freqs, grad)

    want = step(eager)
    for name, (module, forward_launches) in variants.items():
        got = step(module)
        assert rel_err(got[0], want[0]) < 1e-2, name
        assert rel_err(got[1], want[1]) < 1e-2, name
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step(module)
            torch.cuda.synchronize()
        assert flash_forward_launches(prof) == forward_launches, name


def test_unsupported_head_dim_takes_sdpa_with_one_warning_or_fails(caplog):
    """head_dim 264 (above flash4's 256) on this SM90 GPU: auto runs TorchTitan's
    SDPA with one warning naming the reason; flash4 refuses at start-up."""
    from coda_titan.layers import CodaTransformerBlock

    args = TransformerModelArgs(dim=528, n_heads=2, n_kv_heads=1)
    caplog.set_level(logging.INFO)
    block = CodaTransformerBlock(0, args, Coda()).to("cuda", torch.bfloat16)
    records = [r for r in caplog.records if r.getMessage().startswith("CODA attention")]
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("WARNING", "CODA attention: sdpa (TorchTitan's) because head_dim 264 is outside "
                    "flash4's SM90 range "
                    "(8..256, a multiple of 8)")]
    assert block.attention_kernel == "sdpa"
    with pytest.raises(RuntimeError, match="attention = 'flash4' cannot run here: head_dim 264"):
        CodaTransformerBlock(0, args, Coda(attention="flash4"))
