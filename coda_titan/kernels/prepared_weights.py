"""Weight preparation kept from the forward to the backward, for the fused ops.

A fused GEMM reads its projections stacked (wq/wk/wv concatenated, w1/w3
interleaved) with the norm weight folded in, ``W' = stack(W) * g``. That work
depends only on the parameters, so with ``keep`` it is built on first use after
a parameter update and reused by the activation-checkpointing recompute and
the backward's dgrad, instead of once by each (three times per layer under
full AC). The FP8 kernels' weights (folded, cast to e4m3 in the forward's
orientation, with their scale) are prepared the same way, under their own tag,
or all of a model's at once before its forward (``hold``, from
``cutedsl.fp8_operands.prepare_weights``).

A stale entry is never read:
- every ``torch.optim`` optimizer step drops all entries (a global step hook:
  fused optimizers write the parameters without bumping their version counters);
- an entry is valid only while its sources are the same storages, at the same
  addresses, shapes and strides and the same version counters, which every
  other in-place update bumps (``load_state_dict``, ``init_weights``, a
  checkpoint load). The storages are held as weak references: an entry built
  from a detached alias serves its parameter, and one whose tensor was given
  new memory (``p.data = ...``, ``.to()``) dies with the old memory. Writes
  into ``.data`` are not seen, as autograd does not see them either.
The op that reads an entry last in a step (the dgrad in the backward) takes it
out, so the prepared copies are freed while the gradients grow; under full AC,
where the peak is at the end of the backward, memory does not grow at all.
With ``keep=False`` nothing is kept between passes. The converter keeps without
AC and under full AC, not under selective AC or FSDP (which gathers the weights
again for the backward). Not for CUDA-graph capture: a hit while capturing
records no fold, so replays would read the captured weights.
"""

from collections.abc import Callable, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.optim.optimizer import register_optimizer_step_post_hook

_ENTRIES: dict[tuple, tuple[tuple, list[StorageWeakRef], torch.Tensor]] = {}
_MIN_SWEEP = 16
_SWEEP_AT = _MIN_SWEEP


def _key(tag: str, sources: Sequence[torch.Tensor]) -> tuple:
    return (tag, *((s.data_ptr(), s.dtype, s.shape, s.stride()) for s in sources))


def _valid(entry, sources: Sequence[torch.Tensor]) -> bool:
    versions, storages, _ = entry
    return (all(not ref.expired() for ref in storages)
            and versions == tuple(s._version for s in sources))


def held(tag: str, sources: Sequence[torch.Tensor]):
    """The prepared form ``tag`` of ``sources`` where one is held and still valid, else
    None (a stale one dropped, so it is freed before a new one is built)."""
    if not _ENTRIES:  # after every optimizer step: no key to build
        return None
    key = _key(tag, sources)
    entry = _ENTRIES.get(key)
    if entry is not None and _valid(entry, sources):
        return entry[2]
    _ENTRIES.pop(key, None)
    return None


def hold(tag: str, sources: Sequence[torch.Tensor], weight) -> None:
    """Hold ``weight`` as the prepared form ``tag`` of ``sources`` (replacing any)."""
    global _SWEEP_AT
    # Entries whose sources died (a per-call cast of float32 parameters under
    # autocast, a model deleted between optimizer steps) would pin their
    # weights; sweeping them only when the table has doubled keeps the host
    # cost per build constant (a sweep on every build walked about 19,000
    # weak references a step at 8B, in a host-bound step).
    if len(_ENTRIES) >= _SWEEP_AT:
        for dead in [k for k, e in _ENTRIES.items() if any(r.expired() for r in e[1])]:
            del _ENTRIES[dead]
        _SWEEP_AT = max(_MIN_SWEEP, 2 * len(_ENTRIES))
    _ENTRIES[_key(tag, sources)] = (tuple(s._version for s in sources),
                                    [StorageWeakRef(s.untyped_storage()) for s in sources], weight)


def prepared(tag: str, sources: Sequence[torch.Tensor], build: Callable[[], torch.Tensor],
             keep: bool = True) -> torch.Tensor:
    """``build()``, the prepared form ``tag`` of ``sources``, reused while the
    sources are unchanged (``keep``) or built afresh (not ``keep``)."""
    weight = held(tag, sources)
    if weight is not None:
        return weight
    weight = build()
    if keep:
        hold(tag, sources, weight)
    return weight


def taken(tag: str, sources: Sequence[torch.Tensor], build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Like ``prepared``, for the last reader in a step: the entry is removed."""
    weight = prepared(tag, sources, build, keep=False)
    _ENTRIES.pop(_key(tag, sources), None)
    return weight


def clear() -> None:
    """Drop every prepared weight (after an optimizer step)."""
    global _SWEEP_AT
    _ENTRIES.clear()
    _SWEEP_AT = _MIN_SWEEP


def count() -> int:
    """How many prepared weights are held."""
    return len(_ENTRIES)


register_optimizer_step_post_hook(lambda *_: clear())
