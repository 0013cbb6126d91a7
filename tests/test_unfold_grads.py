"""The unfold kernel's argument checks, which run before any GPU work (CPU)."""

import importlib
import sys
import types
from pathlib import Path

import pytest
import torch

PACKAGE = "coda_titan.kernels.cutedsl"


@pytest.fixture
def unfold(monkeypatch):
    # The Triton modules alone: the package's __init__ imports quack (GPU installs only).
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(Path(__file__).resolve().parents[1] / "coda_titan/kernels/cutedsl")]
    monkeypatch.setitem(sys.modules, PACKAGE, package)
    for name in ("fp8_operands", "triton_launch", "unfold_grads"):
        # Recorded, then removed: the modules loaded here are dropped at teardown,
        # and any loaded before come back.
        monkeypatch.setitem(sys.modules, f"{PACKAGE}.{name}", None)
        del sys.modules[f"{PACKAGE}.{name}"]
    return importlib.import_module(f"{PACKAGE}.unfold_grads").unfold


def weights(*shapes):
    return [torch.zeros(s, dtype=torch.bfloat16) for s in shapes]


@pytest.mark.parametrize("grad,ws,norm,interleave", [
    ((8, 16), [], (16,), False),  # no weight
    ((32, 16), [(8, 16)] * 4, (16,), False),  # four weights
    ((8, 16), [(8, 16, 1)], (16,), False),  # a 3-D weight
    ((8, 16), [(16,)], (16,), False),  # a 1-D weight
    ((16, 16), [(8, 16), (8, 24)], (16,), False),  # unequal columns
    ((16, 16), [(8, 16), (4, 16)], (16,), True),  # interleaved, unequal rows
    ((15, 16), [(8, 16), (8, 16)], (16,), False),  # gradient rows not the stack's
    ((16, 16), [(8, 16), (8, 16)], (24,), False),  # norm weight not one per column
])
def test_shapes_it_cannot_unfold_are_refused_with_the_shapes(unfold, grad, ws, norm, interleave):
    with pytest.raises(ValueError, match="unfold of a .* folded gradient into weights"):
        unfold(torch.zeros(grad), weights(*ws), torch.ones(norm), interleave)


def test_a_stack_over_int32_indexing_is_refused(unfold):
    big = torch.empty(2**20, 2**11, device="meta")  # no memory: only its shape is read
    with pytest.raises(ValueError, match="weight-gradient unfold of a 1048576 x 2048 tensor: "
                                         "the kernel indexes in int32"):
        unfold(big, [big], torch.empty(2**11, device="meta"), False)
