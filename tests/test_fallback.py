"""A fused op that runs the reference instead of its kernel says so once, also
under torch.compile (where tracing drops Python logging), and fails instead
where the config insists on the kernels.

On the CPU the flash4 attention core is the real case: it cannot take CPU
tensors, so a converted block forced onto it falls back to TorchTitan's SDPA.
"""

import copy
import logging

import pytest
import torch
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.models.llama3.model.model import TransformerBlock, precompute_freqs_cis

from coda_titan.config import Coda
from coda_titan.kernels import fallback
from coda_titan.layers import CodaTransformerBlock

from .conftest import rel_err


def fallback_lines(caplog):
    return [r.getMessage() for r in caplog.records if "kernel skipped" in r.getMessage()]


@pytest.fixture
def fresh_reports(caplog):
    fallback._reported.clear()
    caplog.set_level(logging.WARNING)
    return caplog


def test_report_under_fullgraph_compile_logs_once_per_op_and_reason(fresh_reports):
    def op(x):
        if x.shape[-1] % 8:
            fallback.report_fallback("toy_op", f"dimension {x.shape[-1]} not a multiple of 8", False)
        return x * 2

    compiled = torch.compile(op, backend="eager", fullgraph=True)
    for _ in range(3):
        compiled(torch.randn(4, 5))
    compiled(torch.randn(4, 16))
    assert fallback_lines(fresh_reports) == [
        "CODA toy_op: kernel skipped (dimension 5 not a multiple of 8); running the PyTorch reference"]


def test_strict_report_raises_under_compile_with_the_reason(fresh_reports):
    def op(x):
        fallback.report_fallback("toy_op", "dtype torch.float32", True)
        return x + 1

    with pytest.raises(RuntimeError, match=r"CODA toy_op: .*\(dtype torch.float32\)"):
        torch.compile(op, backend="eager", fullgraph=True)(torch.randn(3))


def flash4_blocks(coda):
    torch.manual_seed(0)
    args = TransformerModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64,
                                multiple_of=32)
    ref = TransformerBlock(0, args)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    # attention forced to flash4, as the converter resolves it on an SM90 GPU.
    fused = CodaTransformerBlock.convert(copy.deepcopy(ref), coda, "reference", "flash4")
    return ref, fused


def test_compiled_block_that_falls_back_says_so_exactly_once(fresh_reports):
    ref, fused = flash4_blocks(Coda(backend="reference"))
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    freqs = precompute_freqs_cis(16, 32, 10000.0)
    for seed in range(3):
        x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(seed))
        assert rel_err(compiled(x, freqs, None), ref(x, freqs, None)) < 1e-5
    assert fallback_lines(fresh_reports) == [
        "CODA flash4 attention: kernel skipped (tensor not on a CUDA device); "
        "running the PyTorch reference"]


def test_insisting_on_flash4_fails_instead_of_falling_back(fresh_reports):
    _, fused = flash4_blocks(Coda(backend="reference", attention="flash4"))
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    with pytest.raises(RuntimeError, match=r"flash4 attention: .*tensor not on a CUDA device"):
        compiled(torch.randn(2, 9, 64), precompute_freqs_cis(16, 32, 10000.0), None)
    assert fallback_lines(fresh_reports) == []
