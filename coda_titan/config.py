"""The ``[coda]`` config section.

Load it with ``[job] custom_config_module = "coda_titan.config"``; TorchTitan
merges this ``JobConfig`` into its own, so ``--coda.backend=reference`` works
on the command line too. Every value is checked when the config is built: a
bad one fails at start-up with a message naming the key and what it allows.
"""

from dataclasses import dataclass, field, fields

from .backend import ATTENTIONS, BACKENDS
from .kernels.fp8 import RECIPES as FP8_RECIPES

FP8_MODES = ("none", "torchao", "coda")


@dataclass
class Coda:
    fuse_norm_qkv_rope: bool = True
    """attention_norm + wq/wk/wv + RoPE as one op (deferred rstd, ZdZ backward)."""

    fuse_wo_residual: bool = True
    """wo + residual add, also producing the next norm's sum of squares."""

    fuse_norm_swiglu_mlp: bool = True
    """ffn_norm + w1/w3 + SwiGLU + w2 + residual add as one op."""

    fuse_norm_output_loss: bool = True
    """final norm + output + cross-entropy, chunked: no M x V logits. Needs a
    train spec whose loss understands it (``[model] name = "coda_llama3"``)."""

    backend: str = "auto"
    """``auto`` (CuTe DSL kernels on SM90, else reference) | ``cutedsl`` | ``reference``."""

    attention: str = "auto"
    """The attention core: ``flash4`` (FlashAttention-4 reading the packed QKV
    and writing one packed dQKV; SM90, ``flash-attn-4`` installed, TorchTitan's
    causal ``sdpa`` attention, head dim 8..256 and a multiple of 8, bf16) | ``sdpa`` (TorchTitan's
    own) | ``auto`` (``flash4`` where it can run, else ``sdpa``, logging why)."""

    fp8: str = "none"
    """``none``: everything bf16. ``torchao``: fusions in bf16, and the linears
    CODA does not fuse run TorchTitan's float8 converter (list
    ``quantize.linear.float8`` after ``coda`` in ``[model] converters``).
    ``coda``: the fused block ops' GEMMs (forward, dgrad, wgrad) in FP8 with
    ``fp8_recipe``, quantized inside the ops; the LM head stays bf16. The
    kernels implement ``tensorwise`` and ``delayed``; ``blockwise`` runs the
    PyTorch reference only (``backend = "reference"``)."""

    fp8_recipe: str = "tensorwise"
    """With ``fp8 = "coda"``, how operands are scaled: ``tensorwise`` (one scale
    per tensor from its amax, as TorchTitan's float8) | ``delayed`` (activations
    and gradients from their amax over the last 16 steps, Transformer Engine's
    recipe: no amax pass; the history is a buffer of each block, so checkpoints
    of a ``delayed`` run hold it, and one resuming another run's starts it empty) |
    ``blockwise`` (1 x 128 blocks of activations and gradients, 128 x 128 of weights)."""

    loss_chunk_tokens: int = 1024
    """Tokens per chunk of the fused loss. Its memory is one chunk of logits
    (chunk x vocab: bf16 on the kernels, a few fp32 copies on the reference)
    plus an fp32 vocab x dim weight-gradient accumulator."""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if type(value) is not f.type:
                raise ValueError(f"[coda] {f.name} = {value!r} must be a {f.type.__name__}")
        if self.backend not in BACKENDS:
            raise ValueError(
                f"[coda] backend = {self.backend!r} is not valid; "
                f"allowed values: {', '.join(BACKENDS)}"
            )
        if self.attention not in ATTENTIONS:
            raise ValueError(
                f"[coda] attention = {self.attention!r} is not valid; "
                f"allowed values: {', '.join(ATTENTIONS)}"
            )
        if self.fp8 not in FP8_MODES:
            raise ValueError(
                f"[coda] fp8 = {self.fp8!r} is not valid; allowed values: {', '.join(FP8_MODES)}"
            )
        if self.fp8_recipe not in FP8_RECIPES:
            raise ValueError(
                f"[coda] fp8_recipe = {self.fp8_recipe!r} is not valid; "
                f"allowed values: {', '.join(FP8_RECIPES)}"
            )
        if self.loss_chunk_tokens < 1:
            raise ValueError(
                f"[coda] loss_chunk_tokens = {self.loss_chunk_tokens} must be >= 1"
            )


def check_coda_section(section: dict) -> None:
    """Fail on unknown ``[coda]`` keys, naming them and the allowed keys.

    TorchTitan rejects unknown keys too, but without the list of valid ones.
    """
    allowed = [f.name for f in fields(Coda)]
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown key(s) in [coda]: {', '.join(unknown)}; allowed keys: {', '.join(allowed)}"
        )
    Coda(**section)


@dataclass
class JobConfig:
    coda: Coda = field(default_factory=Coda)
