"""FP8 recipes for the fused ops' GEMMs: the PyTorch reference.

Every GEMM of a fused op (forward, dgrad, wgrad) goes through ``gemm(a, b, fp8,
kinds)``; ``fp8`` is the op's precision recipe, None for bf16. An FP8 recipe
scales each operand into FP8 along the contraction dimension K, saturating::

    q(x) = clamp(x * s, -FMAX, FMAX) -> fp8          s = FMAX / amax(x over a scale block)
    a @ b = (q(a) / s_a) @ (q(b) / s_b)              products accumulated in fp32

Forward operands (activations, weights) are e4m3 (FMAX 448), gradients e5m2
(FMAX 57344), as TorchTitan's float8 (torchao) casts them. The scale blocks:

- ``tensorwise``: one scale per operand, from its current amax (torchao's
  "tensorwise", TorchTitan's float8 default).
- ``delayed``: one scale per operand, from the largest amax the same operand
  had over the last ``HISTORY`` optimizer steps (Transformer Engine's delayed
  scaling), so the cast needs no amax pass of its own: it records the current
  amax while it casts. An amax larger than the history saturates.
- ``blockwise``: one scale per 1 x 128 block of K for activations and
  gradients, per 128 x 128 block for weights (DeepSeek-V3's recipe; a tile
  epilogue can compute it locally). K not a multiple of 128 ends in a short block.

Under ``delayed`` (and, to fill it, under ``tensorwise`` when given one) each
activation and gradient has a row of an amax history ``(1 + HISTORY,)``:
entry 0 is the running max of the current step, entries 1.. the past steps,
newest first; ``roll_history`` moves on a step. Weights are always scaled
from their current amax: their amax pass is weight-sized, and where the
converter keeps prepared weights it runs once per optimizer step.

The reference dequantizes and multiplies in float32 (float64 inputs stay
float64), which is what a kernel with fp32 accumulation computes from the same
quantized operands up to the order of the sums, and returns ``a``'s dtype as
the bf16 GEMM does. Which operands are quantized is the fused op's choice
(each op's ``gemm`` calls): a kernel must quantize the same ones to match.
"""

import torch

RECIPES = ("tensorwise", "blockwise", "delayed")
HISTORY = 16
AMAX_FLOOR = 1e-12
BLOCK = 128
FORMATS = {"act": torch.float8_e4m3fn, "weight": torch.float8_e4m3fn, "grad": torch.float8_e5m2}
# The amax history rows of each fused block op, one per activation and gradient
# operand it casts; a block's history (HISTORY_SITES, 1 + HISTORY) stacks them
# in this order, and each op takes the whole of it (a view taken outside an
# opaque op could reach it as a copy, its records lost).
HISTORY_ROWS = {
    "rmsnorm_qkv_rope": ("x", "dzr"),
    "linear_residual_sumsq": ("o", "dh"),
    "rmsnorm_swiglu_mlp": ("h", "a", "dout", "dzr"),
}
HISTORY_SITES = sum(len(rows) for rows in HISTORY_ROWS.values())


def history_index(op: str, row: str) -> int:
    """Where ``op``'s operand ``row`` sits in a block's amax history."""
    flat = [(name, r) for name, rows in HISTORY_ROWS.items() for r in rows]
    return flat.index((op, row))


def history_rows(history: torch.Tensor | None, op: str) -> tuple:
    """The rows of ``op`` in a block's amax history (views), or Nones without one."""
    return tuple(None if history is None else history[history_index(op, row)]
                 for row in HISTORY_ROWS[op])


def _blocks(x: torch.Tensor, kind: str, recipe: str) -> tuple[int, int]:
    """(rows, cols) of one scale block of a (rows, K) operand."""
    if recipe == "blockwise":
        return (BLOCK if kind == "weight" else 1), BLOCK
    return x.shape


def _blocked(x: torch.Tensor, br: int, bk: int) -> torch.Tensor:
    """``x`` (rows, K) zero-padded to whole blocks, viewed (rows/br, br, K/bk, bk)."""
    rows, k = x.shape
    padded = torch.nn.functional.pad(x, (0, -k % bk, 0, -rows % br))
    return padded.view(padded.shape[0] // br, br, padded.shape[1] // bk, bk)


def _unblocked(blocks: torch.Tensor, shape) -> torch.Tensor:
    return blocks.reshape(blocks.shape[0] * blocks.shape[1], -1)[: shape[0], : shape[1]]


def _quantized_blocks(x: torch.Tensor, kind: str, recipe: str, history: torch.Tensor | None = None):
    """``(q, s)`` on the block view of ``x``: ``q`` (rows/br, br, K/bk, bk) in the
    kind's FP8 format, ``s`` broadcastable to it, in the compute dtype. With a
    ``history`` row, the current amax is recorded in it (entry 0)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown FP8 recipe {recipe!r}; expected one of {RECIPES}")
    if recipe == "blockwise" and history is not None:
        raise ValueError("the blockwise FP8 recipe keeps no amax history")
    if recipe == "delayed" and history is None and kind != "weight":
        raise ValueError(f"the delayed FP8 recipe needs an amax history for {kind} operands")
    dtype = FORMATS[kind]
    fmax = torch.finfo(dtype).max
    blocks = _blocked(x.to(_compute_dtype(x)), *_blocks(x, kind, recipe))
    amax = blocks.detach().abs().amax(dim=(1, 3), keepdim=True)
    if history is not None:
        with torch.no_grad():
            history[0] = torch.maximum(history[0], amax.reshape(()).to(history.dtype))
        if recipe == "delayed":
            amax = history[1:].max().to(amax.dtype).reshape(amax.shape)
    # An all-zero block quantizes to zeros with any scale; a tiny amax would make
    # fmax / amax overflow (then 0 * inf = NaN), so it is floored.
    scale = torch.where(amax > 0, fmax / amax.clamp_min(AMAX_FLOOR), torch.ones_like(amax))
    return (blocks * scale).clamp(-fmax, fmax).to(dtype), scale


def roll_history(history: torch.Tensor) -> None:
    """End of an optimizer step: each row's current amax (entry 0) becomes the
    newest past one, the oldest drops out, entry 0 restarts from 0."""
    with torch.no_grad():
        history.copy_(torch.nn.functional.pad(history[..., :-1], (1, 0)))


def quantize(x: torch.Tensor, kind: str, recipe: str,
             history: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, s)`` for a 2-D ``x`` (rows, K): ``q`` in the kind's FP8 format, ``s``
    one scale per block, (ceil(rows / br), ceil(K / bk)), in the compute dtype;
    ``history``: the operand's amax history row, recorded in (and read under ``delayed``)."""
    q, scale = _quantized_blocks(x, kind, recipe, history)
    return _unblocked(q, x.shape), scale[:, 0, :, 0]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def fake_quantize(x: torch.Tensor, kind: str, recipe: str,
                  history: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` through FP8 and back (``q / s``), in the compute dtype (float32; float64 stays)."""
    q, scale = _quantized_blocks(x, kind, recipe, history)
    return _unblocked(q.to(scale.dtype) / scale, x.shape)


def gemm(a: torch.Tensor, b: torch.Tensor, fp8: str | None,
         kinds: tuple[str, str] = ("act", "weight"),
         history: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)) -> torch.Tensor:
    """``a @ b`` for ``a`` (M, K), ``b`` (K, N); under an FP8 recipe, each operand
    quantized along K (``kinds``: what ``a`` and ``b`` are: act, weight or grad;
    ``history``: their amax history rows, None for a weight)."""
    if fp8 is None:
        return a @ b
    (kind_a, kind_b), (history_a, history_b) = kinds, history
    a_q = fake_quantize(a, kind_a, fp8, history_a)
    b_q = fake_quantize(b.t(), kind_b, fp8, history_b).t()
    return (a_q @ b_q).to(a.dtype)
