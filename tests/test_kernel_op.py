"""``kernel_op``: a custom op on the dispatcher with custom_op's interface (CPU)."""

import importlib
import sys

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from coda_titan.kernels.kernel_op import kernel_op

CALLS = []


def define_scale_op(name, factor):
    """``coda_test::name(x, w, note, k) = (x * w * factor, sum(x))``, counting its kernel calls."""

    @kernel_op(f"coda_test::{name}", device_type="cpu")
    def op(x: torch.Tensor, w: torch.Tensor, note: str | None, k: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
        CALLS.append(name)
        return x * w * factor, x.sum(-1)

    @op.register_fake
    def _(x, w, note, k):
        return torch.empty_like(x), x.new_empty(x.shape[:-1])

    def setup_context(ctx, inputs, output):
        x, w, _, _ = inputs
        ctx.save_for_backward(x, w)
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, dy, _dsum):
        x, w = ctx.saved_tensors
        return dy * w * factor, dy * x * factor, None, None

    op.register_autograd(backward, setup_context=setup_context)
    return op


def test_the_op_runs_its_kernel_with_its_gradients():
    op = define_scale_op("scale", 3.0)
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    CALLS.clear()
    y, s = op(x, w, None, 2)
    assert CALLS == ["scale"] and torch.equal(y, x * w * 3.0) and not s.requires_grad
    y.sum().backward()
    assert torch.equal(x.grad, w * 3.0) and torch.equal(w.grad, x * 3.0)
    assert torch.ops.coda_test.scale.default(x, w, "a", 1)[0].shape == (4, 8)
    assert str(torch.ops.coda_test.scale.default._schema) == (
        "coda_test::scale(Tensor x, Tensor w, str? note, SymInt k) -> (Tensor, Tensor)")


def test_checkpointed_under_compile_it_is_recomputed_with_equal_gradients():
    op = define_scale_op("checkpointed", 0.5)

    def block(x, w):
        y, s = op(torch.sin(x), w, "n", 3)
        return y * s[:, None]

    def checkpointed(x, w):
        return checkpoint(block, x, w, use_reentrant=False)

    x0, w0 = torch.randn(4, 8), torch.randn(4, 8)
    grads = []
    # As TorchTitan compiles a block: the checkpoint inside the compiled region.
    for fn in (checkpointed, torch.compile(checkpointed, fullgraph=True)):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        CALLS.clear()
        out = fn(x, w)
        out.square().sum().backward()
        # The forward, then its recompute for the backward.
        assert CALLS == ["checkpointed"] * 2
        grads.append((out.detach(), x.grad, w.grad))
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager)


def test_a_redefined_op_replaces_the_first():
    define_scale_op("redefined", 1.0)
    op = define_scale_op("redefined", 2.0)
    x = torch.ones(2, 2)
    assert torch.equal(op(x, x, None, 0)[0], 2 * x)


def test_a_redefinition_without_a_schema_leaves_the_op_working():
    op = define_scale_op("kept", 2.0)

    def unannotated(x):
        return x

    with pytest.raises(ValueError):
        kernel_op("coda_test::kept", device_type="cpu")(unannotated)
    x = torch.ones(2, 2)
    assert torch.equal(op(x, x, None, 0)[0], 2 * x)


def test_reloading_the_module_keeps_the_ops():
    op = define_scale_op("reloaded", 3.0)
    importlib.reload(sys.modules[kernel_op.__module__])
    x = torch.ones(2, 2)
    assert torch.equal(op(x, x, None, 0)[0], 3 * x)


def test_an_unknown_device_is_refused():
    with pytest.raises(ValueError, match="device_type must be one of"):
        kernel_op("coda_test::nowhere", device_type="tpu")(lambda x: x)


@pytest.mark.parametrize("qualname", ["no_namespace", "coda_test::", "::name", "a::b::c"])
def test_a_name_without_one_namespace_is_refused(qualname):
    with pytest.raises(ValueError, match="the name must be 'namespace::name'"):
        kernel_op(qualname)(lambda x: x)
