"""The step of the ``delayed`` FP8 recipe: after each optimizer step, every
converted block's amax history moves on (``fp8.roll_history``).

Across data-parallel ranks the current amaxes are reduced (max) first, so every
rank keeps the same history and scales alike, and a checkpoint (which saves
the buffers once) resumes every rank exactly. The converter's
``post_optimizer_hook`` runs this; a model converted by hand calls ``step``
after its optimizer's.

A non-finite current amax (a diverging step) is recorded as 0. Saturation: a
delayed scale comes from past amaxes, so an operand whose amax
grows past its history saturates (clamps at the format's max) in that step.
The steps where that happened are counted on the device and read every
``check_every`` steps; an operand that saturated in more than half of them is
logged, with its layer and name.
"""

import torch
import torch.distributed as dist
from torch import nn
from torchtitan.tools.logging import logger

from ..kernels.fp8 import HISTORY_ROWS, roll_history
from .block import CodaTransformerBlock

SITE_NAMES = [f"{op}.{row}" for op, rows in HISTORY_ROWS.items() for row in rows]


# Module names that compile and activation checkpointing wrap around a block.
WRAPPERS = ("_orig_mod.", "_checkpoint_wrapped_module.")


def delayed_blocks(model_parts: nn.Module | list[nn.Module]) -> list[tuple[str, CodaTransformerBlock]]:
    """(name, block) of each converted block keeping an amax history, in module
    order; names as in the state dict (``layers.3``), without wrapper modules."""
    parts = model_parts if isinstance(model_parts, list) else [model_parts]
    found = [(name, module) for part in parts for name, module in part.named_modules()
             if isinstance(module, CodaTransformerBlock) and module.fp8 == "delayed"]
    for wrapper in WRAPPERS:
        found = [(name.replace(wrapper, ""), module) for name, module in found]
    return found


class DelayedScaling:
    """Steps the amax histories of a model's blocks; logs operands that keep saturating."""

    def __init__(self, check_every: int = 100):
        self.check_every = check_every
        self.steps = 0
        self.saturated: torch.Tensor | None = None

    def step(self, model_parts: nn.Module | list[nn.Module]) -> None:
        blocks = delayed_blocks(model_parts)
        if not blocks:
            return
        histories = [block.fp8_amax_history for _, block in blocks]
        stacked = torch.stack(histories)
        # A non-finite amax (a diverging step) is dropped: kept, it would zero the
        # operand's scale for the whole history.
        current = torch.nan_to_num(stacked[:, :, 0], nan=0.0, posinf=0.0)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(current, op=dist.ReduceOp.MAX)
        if all(block.fp8_history_ready for _, block in blocks):  # this step scaled delayed
            saturated = (current > stacked[:, :, 1:].amax(-1)).int()
            self.saturated = saturated if self.saturated is None else self.saturated + saturated
        stacked[:, :, 0] = current
        roll_history(stacked)
        torch._foreach_copy_(histories, list(stacked.unbind(0)))
        for _, block in blocks:
            block.fp8_history_ready = True
        self.steps += 1
        if self.steps % self.check_every == 0:
            self._report([name for name, _ in blocks])

    def _report(self, names: list[str]) -> None:
        if self.saturated is None:
            return
        counts, self.saturated = self.saturated.tolist(), None
        often = [(f"{name}.{site}", n) for name, row in zip(names, counts)
                 for site, n in zip(SITE_NAMES, row) if 2 * n > self.check_every]
        if often:
            listed = ", ".join(f"{site} ({n})" for site, n in often[:8])
            logger.warning(
                f"FP8 delayed scaling: {len(often)} operand(s) saturated in more than half of the "
                f"last {self.check_every} steps (their amax keeps outgrowing its history): "
                f"{listed}{' ...' if len(often) > 8 else ''}")
