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
- ``blockwise``: one scale per 1 x 128 block of K for activations and
  gradients, per 128 x 128 block for weights (DeepSeek-V3's recipe; a tile
  epilogue can compute it locally). K not a multiple of 128 ends in a short block.

The reference dequantizes and multiplies in float32 (float64 inputs stay
float64), which is what a kernel with fp32 accumulation computes from the same
quantized operands up to the order of the sums, and returns ``a``'s dtype as
the bf16 GEMM does. Which operands are quantized is the fused op's choice
(each op's ``gemm`` calls): a kernel must quantize the same ones to match.
"""

import torch

RECIPES = ("tensorwise", "blockwise")
AMAX_FLOOR = 1e-12
BLOCK = 128
FORMATS = {"act": torch.float8_e4m3fn, "weight": torch.float8_e4m3fn, "grad": torch.float8_e5m2}


def _blocks(x: torch.Tensor, kind: str, recipe: str) -> tuple[int, int]:
    """(rows, cols) of one scale block of a (rows, K) operand."""
    if recipe == "tensorwise":
        return x.shape
    return (BLOCK if kind == "weight" else 1), BLOCK


def _blocked(x: torch.Tensor, br: int, bk: int) -> torch.Tensor:
    """``x`` (rows, K) zero-padded to whole blocks, viewed (rows/br, br, K/bk, bk)."""
    rows, k = x.shape
    padded = torch.nn.functional.pad(x, (0, -k % bk, 0, -rows % br))
    return padded.view(padded.shape[0] // br, br, padded.shape[1] // bk, bk)


def _unblocked(blocks: torch.Tensor, shape) -> torch.Tensor:
    return blocks.reshape(blocks.shape[0] * blocks.shape[1], -1)[: shape[0], : shape[1]]


def _quantized_blocks(x: torch.Tensor, kind: str, recipe: str):
    """``(q, s)`` on the block view of ``x``: ``q`` (rows/br, br, K/bk, bk) in the
    kind's FP8 format, ``s`` broadcastable to it, in the compute dtype."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown FP8 recipe {recipe!r}; expected one of {RECIPES}")
    dtype = FORMATS[kind]
    fmax = torch.finfo(dtype).max
    blocks = _blocked(x.to(_compute_dtype(x)), *_blocks(x, kind, recipe))
    amax = blocks.detach().abs().amax(dim=(1, 3), keepdim=True)
    # An all-zero block quantizes to zeros with any scale; a tiny amax would make
    # fmax / amax overflow (then 0 * inf = NaN), so it is floored.
    scale = torch.where(amax > 0, fmax / amax.clamp_min(AMAX_FLOOR), torch.ones_like(amax))
    return (blocks * scale).clamp(-fmax, fmax).to(dtype), scale


def quantize(x: torch.Tensor, kind: str, recipe: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, s)`` for a 2-D ``x`` (rows, K): ``q`` in the kind's FP8 format, ``s``
    one scale per block, (ceil(rows / br), ceil(K / bk)), in the compute dtype."""
    q, scale = _quantized_blocks(x, kind, recipe)
    return _unblocked(q, x.shape), scale[:, 0, :, 0]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def fake_quantize(x: torch.Tensor, kind: str, recipe: str) -> torch.Tensor:
    """``x`` through FP8 and back (``q / s``), in the compute dtype (float32; float64 stays)."""
    q, scale = _quantized_blocks(x, kind, recipe)
    return _unblocked(q.to(scale.dtype) / scale, x.shape)


def gemm(a: torch.Tensor, b: torch.Tensor, fp8: str | None,
         kinds: tuple[str, str] = ("act", "weight")) -> torch.Tensor:
    """``a @ b`` for ``a`` (M, K), ``b`` (K, N); under an FP8 recipe, each operand
    quantized along K (``kinds``: what ``a`` and ``b`` are: act, weight or grad)."""
    if fp8 is None:
        return a @ b
    kind_a, kind_b = kinds
    a_q = fake_quantize(a, kind_a, fp8)
    b_q = fake_quantize(b.t(), kind_b, fp8).t()
    return (a_q @ b_q).to(a.dtype)
