"""Weight preparation once per parameter update (``kernels.prepared_weights``)."""

import pytest
import torch
from torch import nn

from coda_titan.kernels import prepared_weights as pw


@pytest.fixture(autouse=True)
def empty():
    pw.clear()
    yield
    pw.clear()


class Builder:
    def __init__(self, *sources):
        self.sources, self.builds = sources, 0

    def __call__(self):
        self.builds += 1
        return sum(s.sum() for s in self.sources).reshape(1)


def test_reused_until_a_source_changes_in_place():
    w, g = torch.randn(4, 3), torch.randn(3)
    build = Builder(w, g)
    first = pw.prepared("fold", [w, g], build)
    assert pw.prepared("fold", [w.detach(), g], build) is first  # an alias is the same source
    assert build.builds == 1
    with torch.no_grad():
        g.mul_(2)  # what the optimizer step does
    second = pw.prepared("fold", [w, g], build)
    assert build.builds == 2 and torch.allclose(second, w.sum() + g.sum())


def test_load_state_dict_invalidates():
    model = nn.Linear(3, 4, bias=False)
    build = Builder(model.weight)
    pw.prepared("fold", [model.weight], build)
    model.load_state_dict({"weight": torch.ones(4, 3)})
    assert pw.prepared("fold", [model.weight], build).item() == 12
    assert build.builds == 2


def test_tags_and_views_are_separate_entries():
    w = torch.randn(4, 3)
    build = Builder(w)
    pw.prepared("fold:True", [w], build)
    pw.prepared("fold:False", [w], build)
    pw.prepared("fold:True", [w[:2]], build)
    assert build.builds == 3 and pw.count() == 3


def test_taken_releases_and_keep_false_stores_nothing():
    w = torch.randn(4, 3)
    build = Builder(w)
    kept = pw.prepared("fold", [w], build)
    assert pw.taken("fold", [w], build) is kept and pw.count() == 0
    pw.prepared("fold", [w], build, keep=False)
    assert pw.count() == 0 and build.builds == 2
    assert pw.taken("fold", [w], build) is not kept and build.builds == 3


def test_dead_sources_do_not_pin_their_entries():
    live = [torch.randn(8, 8) for _ in range(20)]
    for w in live:
        pw.prepared("fold", [w], Builder(w))
    for _ in range(100):  # a fresh source each time, dead after its build
        w = torch.randn(64, 64)
        pw.prepared("fold", [w], Builder(w))
        del w
    # the dead are swept once the table doubles; the live stay
    assert 20 < pw.count() <= 40
    assert all(pw.prepared("fold", [w], pytest.fail) is not None for w in live)


def test_a_new_storage_at_the_same_address_and_version_is_rebuilt():
    memory = bytearray(32)
    old = torch.frombuffer(memory, dtype=torch.float32)
    pw.prepared("fold", [old], Builder(old))
    del old
    memory[:4] = torch.tensor([5.0]).numpy().tobytes()
    new = torch.frombuffer(memory, dtype=torch.float32)  # same pointer, version 0
    assert new._version == 0
    assert pw.prepared("fold", [new], Builder(new)).item() == 5


@pytest.mark.parametrize("fused", [True, False])
def test_every_optimizer_step_drops_the_entries(fused):
    """Fused optimizers write the parameters without bumping version counters."""
    model = nn.Linear(3, 4, bias=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    build = Builder(model.weight)
    pw.prepared("fold", [model.weight], build)
    model.weight.grad = torch.ones_like(model.weight)
    optimizer.step()
    assert pw.count() == 0
    pw.prepared("fold", [model.weight], build)
    assert build.builds == 2


def test_an_entry_built_from_a_detached_alias_serves_its_parameter():
    """The MLP's first op gets detached weights; the recompute and the dgrad look
    them up with the parameters themselves."""
    w = torch.randn(4, 3)
    build = Builder(w)
    kept = pw.prepared("fold", [w.detach()], build)
    assert pw.taken("fold", [w], build) is kept and build.builds == 1


def test_a_tensor_given_new_memory_leaves_its_entry_stale():
    """``p.data = ...`` (``Module.to``, ``to_empty``): the old address may be reused."""
    memory = bytearray(64)
    a = torch.frombuffer(memory, dtype=torch.float32)
    pw.prepared("fold", [a], Builder(a))
    a.data = torch.zeros(16)
    b = torch.frombuffer(memory, dtype=torch.float32)  # the old address, version 0
    memory[:4] = torch.tensor([3.0]).numpy().tobytes()
    assert pw.prepared("fold", [b], Builder(b)).item() == 3
