"""The ``coda`` model converter: TorchTitan llama3 -> CODA-fused llama3.

Enabled by ``[model] converters = ["coda"]`` once ``coda_titan`` is imported
(``[experimental] custom_import = "coda_titan"``), configured by the ``[coda]``
section (``[job] custom_config_module = "coda_titan.config"``). Like the other
TorchTitan converters it runs on the meta-device model before parallelization
and compile, and changes no parameter: each ``TransformerBlock`` becomes a
``CodaTransformerBlock`` in place, and with ``fuse_norm_output_loss`` the
final ``norm``/``output`` defer to the fused loss. State dicts are identical,
so checkpoints move freely between baseline and converted runs, except under
the ``delayed`` FP8 recipe, whose blocks add their amax history (a buffer).

Which linears it fuses (their weights are read directly by the fused ops, so
no other converter may replace them):
``attention.wq/wk/wv`` (norm+QKV+RoPE), ``attention.wo`` (wo+residual),
``feed_forward.w1/w2/w3`` (norm+SwiGLU MLP) and ``output`` (norm+output+loss).
With ``[coda] fp8 = "torchao"`` the rest go through TorchTitan's float8
converter, whose ``filter_fqns`` must exclude the fused ones; with ``fp8 =
"coda"`` the fused ops run their GEMMs in FP8 themselves.
"""

from torch import nn
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.models.llama3.model.model import Transformer
from torchtitan.protocols.model_converter import register_model_converter
from torchtitan.tools.logging import logger

from .backend import (
    FP8_KERNEL_RECIPES, resolve_attention, resolve_backend, resolve_fp8_backend)
from .config import Coda
from .kernels import prepared_weights
from .layers import CodaTransformerBlock, DeferredRMSNorm, FusedLMHead
from .layers.block import prepare_fp8_weights
from .layers.delayed_scaling import DelayedScaling

FLOAT8_CONVERTER = "quantize.linear.float8"


def fused_linear_fqns(model: Transformer, coda: Coda) -> list[str]:
    """Fully qualified names of the linears CODA fuses (it reads their weights)."""
    names = []
    if coda.fuse_norm_qkv_rope:
        names += ["attention.wq", "attention.wk", "attention.wv"]
    if coda.fuse_wo_residual:
        names += ["attention.wo"]
    if coda.fuse_norm_swiglu_mlp:
        names += ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    fqns = [f"layers.{layer}.{name}" for layer in model.layers for name in names]
    return fqns + (["output"] if coda.fuse_norm_output_loss else [])


def keeps_folded_weights(ac_mode: str, fsdp: bool) -> bool:
    """Whether the kernels keep the folded weights from the forward to the dgrad
    (``kernels.prepared_weights``), by TorchTitan's AC mode.

    Measured on an H200 (docs/results.md): under full AC they are then built
    once instead of three times per layer (8B: -10 ms a step, peak unchanged,
    as it comes at the end of the backward); without AC once instead of twice
    (1B -2, 3B -4 ms, peak +1.2 / +3.4 GiB, still 7.2 / 1.7 GiB under
    TorchTitan's). Not under selective AC, where CODA saves more than TorchTitan
    already (8B seq 8192: 8.5 GiB more for ~6 ms), nor under FSDP, which gathers
    the weights again for the backward. These figures are bf16's; under
    ``fp8 = "coda"`` the kept weights are FP8 in the forward's orientation, wo
    and w2 included (8B full AC: peak 60.0 GiB, as bf16 and float8).
    """
    return ac_mode in ("none", "full") and not fsdp


def bf16_activations_reason(job_config: JobConfig, parallel_dims: ParallelDims) -> str | None:
    """Why this run's blocks will not see bf16 activations (what the kernels take), or None."""
    training = job_config.training
    if training.dtype == "bfloat16":
        return None
    if parallel_dims.fsdp_enabled and training.mixed_precision_param == "bfloat16":
        return None
    return ('the residual stream is float32 ([training] dtype = "float32" without FSDP '
            'mixed precision); set [training] dtype = "bfloat16" for the kernels')


class CodaConverter:
    """Swap TorchTitan llama3 blocks and head for their CODA-fused versions."""

    def __init__(self, job_config: JobConfig, parallel_dims: ParallelDims):
        coda = getattr(job_config, "coda", None)
        if coda is None:
            raise ValueError(
                'the "coda" converter needs the [coda] config section: set '
                '[job] custom_config_module = "coda_titan.config"'
            )
        if parallel_dims.tp_enabled or parallel_dims.pp_enabled or parallel_dims.cp_enabled:
            raise NotImplementedError(
                "the coda converter supports data parallelism (FSDP/DDP) only, "
                "not tensor, pipeline or context parallelism"
            )
        other_quantizers = [c for c in job_config.model.converters
                            if c.startswith("quantize.") and c != FLOAT8_CONVERTER]
        if other_quantizers:
            raise NotImplementedError(
                f"the coda converter combines with {FLOAT8_CONVERTER} only, not {other_quantizers}"
            )
        from .train_spec import CODA_TRAIN_SPECS  # here: train_spec imports this module

        if coda.fuse_norm_output_loss and job_config.model.name not in CODA_TRAIN_SPECS:
            raise ValueError(
                f"[coda] fuse_norm_output_loss = true needs a train spec whose loss "
                f"accepts the fused head; set [model] name to one of "
                f"{sorted(CODA_TRAIN_SPECS)} (got {job_config.model.name!r}), or "
                f"set fuse_norm_output_loss = false"
            )
        if (coda.fuse_norm_output_loss and parallel_dims.fsdp_enabled
                and job_config.parallelism.fsdp_reshard_after_forward == "always"):
            raise ValueError(
                '[coda] fuse_norm_output_loss reads the norm and output weights in the loss, '
                'after their forward; [parallelism] fsdp_reshard_after_forward = "always" frees '
                'them there. Use "default" or "never", or set fuse_norm_output_loss = false'
            )
        self._check_fp8_converters(coda, job_config)
        if (coda.fp8 == "coda" and coda.fp8_recipe == "delayed"
                and job_config.training.enable_cpu_offload):
            raise ValueError(
                '[coda] fp8_recipe = "delayed" records amaxes on the GPU, into each block\'s '
                'amax history buffer; [training] enable_cpu_offload builds the model on the '
                'CPU, where those buffers would stay. Use fp8_recipe = "tensorwise" with CPU '
                'offload'
            )
        self.coda = coda
        self.float8_filters = (job_config.quantize.linear.float8.filter_fqns
                               if FLOAT8_CONVERTER in job_config.model.converters else None)
        self.activations_blocker = bf16_activations_reason(job_config, parallel_dims)
        self.keep_weights = keeps_folded_weights(job_config.activation_checkpoint.mode,
                                                 parallel_dims.fsdp_enabled)
        self.backend = (
            resolve_fp8_backend(coda.backend, coda.fp8_recipe, self.activations_blocker)
            if coda.fp8 == "coda" else resolve_backend(coda.backend, self.activations_blocker))
        self.delayed_scaling = DelayedScaling()

    @staticmethod
    def _check_fp8_converters(coda: Coda, job_config: JobConfig) -> None:
        converters = job_config.model.converters
        if FLOAT8_CONVERTER not in converters:
            if coda.fp8 == "torchao":
                raise ValueError(
                    f'[coda] fp8 = "torchao" needs "{FLOAT8_CONVERTER}" after "coda" '
                    f"in [model] converters (got {converters})"
                )
            return
        if coda.fp8 == "coda":
            raise ValueError(
                f'[coda] fp8 = "coda" quantizes inside the fused ops; remove "{FLOAT8_CONVERTER}" '
                f'from [model] converters, or set fp8 = "torchao" to combine them'
            )
        if coda.fp8 != "torchao":
            raise ValueError(
                f'"{FLOAT8_CONVERTER}" is in [model] converters but [coda] fp8 = '
                f'{coda.fp8!r}; set fp8 = "torchao" to combine them'
            )
        if converters.index(FLOAT8_CONVERTER) < converters.index("coda"):
            raise ValueError(f'list "coda" before "{FLOAT8_CONVERTER}" in [model] converters')

    def convert(self, model: nn.Module) -> None:
        if self.float8_filters is not None and isinstance(model, Transformer):
            # float8's filter skips a linear when any filter string is part of its FQN.
            missing = [fqn for fqn in fused_linear_fqns(model, self.coda)
                       if not any(f in fqn for f in self.float8_filters)]
            if missing:
                raise ValueError(
                    "these linears are fused by CODA and must stay out of float8; add their "
                    f"names to [quantize.linear.float8] filter_fqns: {missing[:6]}"
                    + (f" (and {len(missing) - 6} more)" if len(missing) > 6 else "")
                )
        convert_model(model, self.coda, self.backend,
                      model_attention(model, self.coda, self.activations_blocker),
                      self.keep_weights)

    def post_optimizer_hook(self, model: nn.Module | list[nn.Module]) -> None:
        """The weights changed: drop their prepared (folded) forms, built again on
        first use. ``torch.optim`` steps do so already (``prepared_weights``);
        this covers any other optimizer TorchTitan is given. Under the ``delayed``
        FP8 recipe, the amax histories move on a step (``DelayedScaling``)."""
        prepared_weights.clear()
        self.delayed_scaling.step(model)


def model_attention(model: nn.Module, coda: Coda, blocker: str | None = None) -> str:
    """``coda.attention`` resolved for this model's attention (head dim, TorchTitan
    ``attn_type``): ``sdpa`` or ``flash4``, logged once; ``flash4`` that cannot run
    raises here, at start-up."""
    _check_llama3(model)
    attention = next(iter(model.layers.values())).attention
    return resolve_attention(coda.attention, attention.head_dim, attention.attn_type, blocker)


def _check_llama3(model: nn.Module) -> None:
    if not isinstance(model, Transformer):
        raise TypeError(
            f"the coda converter handles TorchTitan llama3 Transformer models, "
            f"got {type(model).__name__}"
        )


def convert_model(model: nn.Module, coda: Coda, backend: str, attention: str | None = None,
                  keep_weights: bool = False) -> None:
    """Convert a TorchTitan llama3 ``Transformer`` in place (what the converter runs).

    ``backend`` is a resolved backend (``resolve_backend(coda.backend)``),
    ``attention`` a resolved attention core (``model_attention``; resolved here
    when not given), ``keep_weights`` whether the kernels keep the folded weights
    from the forward to the backward (``kernels.ops_for``).
    """
    _check_llama3(model)
    if coda.fp8 == "coda" and backend != "reference" and coda.fp8_recipe not in FP8_KERNEL_RECIPES:
        raise ValueError(f'[coda] fp8_recipe = {coda.fp8_recipe!r} runs on the reference backend '
                         f'only, not {backend!r}')
    attention = attention or model_attention(model, coda)
    if (coda.fuse_norm_qkv_rope or coda.fuse_wo_residual or coda.fuse_norm_swiglu_mlp
            or attention != "sdpa"):
        for block in model.layers.values():
            CodaTransformerBlock.convert(block, coda, backend, attention, keep_weights)
        if coda.fp8 == "coda" and backend == "cutedsl" and keep_weights:
            model.register_forward_pre_hook(prepare_fp8_weights)
    if coda.fuse_norm_output_loss:
        model.norm.__class__ = DeferredRMSNorm
        model.output.__class__ = FusedLMHead
        model.output.backend = backend
        model.output.strict = coda.backend == "cutedsl"
        model.output.chunk_tokens = coda.loss_chunk_tokens
    on = [name for name in ("norm_qkv_rope", "wo_residual", "norm_swiglu_mlp", "norm_output_loss")
          if getattr(coda, f"fuse_{name}")]
    logger.info(
        f"CODA: converted {len(model.layers)} blocks, fusions {on or 'none'}, backend {backend}, "
        f"attention {attention}"
        + (f", FP8 {coda.fp8_recipe} GEMMs in the fused block ops" if coda.fp8 == "coda" else "")
    )


register_model_converter(CodaConverter, "coda")
