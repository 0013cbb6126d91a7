"""The folded weights are built once per step and never stale (pytest -m gpu).

A converted model (cutedsl kernels, per-block compile, with and without full
AC, the folded weights kept from the forward to the dgrad or built by each
pass) trains with a large learning rate, so a stale folded weight would move the
loss by far more than the tolerance. Before each optimizer step (and before a
``load_state_dict``) it runs one more forward whose backward never comes, so
prepared weights are left behind for the update to invalidate. After each step
its loss and gradients must match a freshly converted model loaded from the
same state dict.
"""

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.models.llama3.model.model import Transformer

from coda_titan.config import Coda
from coda_titan.converter import convert_model
from coda_titan.kernels import prepared_weights
from coda_titan.layers.block import prepare_fp8_weights

from .conftest import rel_err

pytest.importorskip("quack")
from coda_titan.kernels.cutedsl import gemm  # noqa: E402

pytestmark = pytest.mark.gpu

ARGS = TransformerModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=1024,
                            multiple_of=256, rope_theta=500000, max_seq_len=256)


@pytest.fixture(autouse=True)
def gpu_only():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an SM90 GPU")
    prepared_weights.clear()


def converted(seed, full_ac, keep=True, fp8="none"):
    torch.manual_seed(seed)
    model = Transformer(ARGS).to("cuda", torch.bfloat16)
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cuda"))
        for name, p in model.named_parameters():
            if "norm" in name:  # away from 1, so that the fold matters
                p.uniform_(0.5, 1.5)
    convert_model(model, Coda(backend="cutedsl", attention="sdpa", loss_chunk_tokens=256,
                              fp8=fp8), "cutedsl", keep_weights=keep)
    for name, block in list(model.layers.named_children()):
        block = checkpoint_wrapper(block, preserve_rng_state=False) if full_ac else block
        model.layers.register_module(name, torch.compile(block, fullgraph=True))
    return model


def batch(seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 257), device="cuda", generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def loss_and_grads(model, seed):
    model.zero_grad(set_to_none=True)
    inputs, labels = batch(seed)
    loss = model(inputs).loss(labels) / labels.numel()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_matches_fresh(model, full_ac, seed, folds):
    """Check the model's loss and gradients against a fresh model's; ``folds``
    gets the model's folds only."""
    fresh = converted(seed=99, full_ac=full_ac)
    fresh.load_state_dict(model.state_dict())
    before = len(folds)
    loss, grads = loss_and_grads(model, seed)
    del folds[:before]
    fresh_folds = len(folds)
    fresh_loss, fresh_grads = loss_and_grads(fresh, seed)
    del folds[fresh_folds:]
    assert abs(loss - fresh_loss) < 1e-4, (loss, fresh_loss)
    errors = {n: rel_err(grads[n], fresh_grads[n]) for n in grads}
    assert max(errors.values()) < 1e-3, errors


def leave_prepared_weights(model, seed, keep):
    """A forward with grad on and no backward: its folded weights stay prepared (keep)."""
    inputs, _ = batch(seed)
    model(inputs)
    assert prepared_weights.count() == (2 * ARGS.n_layers if keep else 0)


@pytest.mark.parametrize("full_ac,keep", [(False, True), (True, True), (True, False)])
def test_folded_weights_follow_optimizer_steps_and_load_state_dict(full_ac, keep, monkeypatch):
    folds = []
    build = gemm._fold_weight
    monkeypatch.setattr(gemm, "_fold_weight", lambda *a: folds.append(1) or build(*a))
    model = converted(seed=0, full_ac=full_ac, keep=keep)
    # Kept: once per block op and step. Not kept: by the forward, the recompute
    # and the dgrad. The LM head folds once, in its forward.
    passes = 1 if keep else 2 + full_ac
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(3):
        assert_matches_fresh(model, full_ac, step, folds)
        assert len(folds) == 2 * ARGS.n_layers * passes + 1, len(folds)
        assert prepared_weights.count() == 0  # the dgrads released them
        leave_prepared_weights(model, 100 + step, keep)
        optimizer.step()
    # The steps moved every folded weight well beyond the tolerances above.
    moved = {n: rel_err(p, initial[n]) for n, p in model.named_parameters()
             if any(k in n for k in ("norm", "wq", "wk", "wv", "w1", "w3"))}
    assert min(moved.values()) > 0.01, moved
    leave_prepared_weights(model, 200, keep)
    model.load_state_dict(converted(seed=7, full_ac=full_ac).state_dict())
    assert_matches_fresh(model, full_ac, 3, folds)


def test_fp8_weights_prepared_before_the_forward_follow_optimizer_steps():
    """Under ``fp8 = "coda"`` the model's pre-forward hook casts every block's
    four FP8 weights at once; after each optimizer step the model's loss and
    gradients match a fresh model's whose blocks cast their own (its hook removed)."""
    model = converted(seed=0, full_ac=True, fp8="coda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        prepare_fp8_weights(model, ())
        assert prepared_weights.count() == 4 * ARGS.n_layers
        prepare_fp8_weights(model, ())  # all held: none built again
        assert prepared_weights.count() == 4 * ARGS.n_layers
        fresh = converted(seed=99, full_ac=True, fp8="coda")
        fresh.load_state_dict(model.state_dict())
        fresh._forward_pre_hooks.clear()
        loss, grads = loss_and_grads(model, step)
        assert prepared_weights.count() == 0  # the dgrads released them
        fresh_loss, fresh_grads = loss_and_grads(fresh, step)
        assert abs(loss - fresh_loss) < 1e-4, (loss, fresh_loss)
        errors = {n: rel_err(grads[n], fresh_grads[n]) for n in grads}
        assert max(errors.values()) < 1e-3, errors
        model(batch(100 + step)[0])  # a forward whose backward never comes
        optimizer.step()
        assert prepared_weights.count() == 0
