"""The ``coda`` model converter: TorchTitan llama3 -> CODA-fused llama3.

Enabled by ``[model] converters = ["coda"]`` once ``coda_titan`` is imported
(``[experimental] custom_import = "coda_titan"``), configured by the ``[coda]``
section (``[job] custom_config_module = "coda_titan.config"``). Like the other
TorchTitan converters it runs on the meta-device model before parallelization
and compile, and changes no parameter: each ``TransformerBlock`` becomes a
``CodaTransformerBlock`` in place, and with ``fuse_norm_output_loss`` the
final ``norm``/``output`` defer to the fused loss. State dicts are identical,
so checkpoints move freely between baseline and converted runs.

Which linears it fuses (their weights are read directly by the fused ops, so
no other converter may replace them):
``attention.wq/wk/wv`` (norm+QKV+RoPE), ``attention.wo`` (wo+residual),
``feed_forward.w1/w2/w3`` (norm+SwiGLU MLP) and ``output`` (norm+output+loss).
With ``[coda] fp8 = "torchao"`` the rest go through TorchTitan's float8
converter, whose ``filter_fqns`` must exclude the fused ones.
"""

from torch import nn
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.models.llama3.model.model import Transformer
from torchtitan.protocols.model_converter import register_model_converter
from torchtitan.tools.logging import logger

from .backend import resolve_backend
from .config import Coda
from .layers import CodaTransformerBlock, DeferredRMSNorm, FusedLMHead

FLOAT8_CONVERTER = "quantize.linear.float8"


def fused_linear_names(coda: Coda) -> list[str]:
    """Block-relative (and top-level ``output``) names of the linears CODA fuses."""
    names = []
    if coda.fuse_norm_qkv_rope:
        names += ["attention.wq", "attention.wk", "attention.wv"]
    if coda.fuse_wo_residual:
        names += ["attention.wo"]
    if coda.fuse_norm_swiglu_mlp:
        names += ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    if coda.fuse_norm_output_loss:
        names += ["output"]
    return names


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
        from .train_spec import CODA_TRAIN_SPECS

        if coda.fuse_norm_output_loss and job_config.model.name not in CODA_TRAIN_SPECS:
            raise ValueError(
                f"[coda] fuse_norm_output_loss = true needs a train spec whose loss "
                f"accepts the fused head; set [model] name to one of "
                f"{sorted(CODA_TRAIN_SPECS)} (got {job_config.model.name!r}), or "
                f"set fuse_norm_output_loss = false"
            )
        self._check_fp8(coda, job_config)
        self.coda = coda
        self.backend = resolve_backend(coda.backend)

    @staticmethod
    def _check_fp8(coda: Coda, job_config: JobConfig) -> None:
        converters = job_config.model.converters
        if FLOAT8_CONVERTER not in converters:
            if coda.fp8 == "torchao":
                raise ValueError(
                    f'[coda] fp8 = "torchao" needs "{FLOAT8_CONVERTER}" after "coda" '
                    f"in [model] converters (got {converters})"
                )
            return
        if coda.fp8 != "torchao":
            raise ValueError(
                f'"{FLOAT8_CONVERTER}" is in [model] converters but [coda] fp8 = '
                f'{coda.fp8!r}; set fp8 = "torchao" to combine them'
            )
        if converters.index(FLOAT8_CONVERTER) < converters.index("coda"):
            raise ValueError(f'list "coda" before "{FLOAT8_CONVERTER}" in [model] converters')
        filters = job_config.quantize.linear.float8.filter_fqns
        missing = [n for n in fused_linear_names(coda) if not any(f in n for f in filters)]
        if missing:
            raise ValueError(
                "these linears are fused by CODA and must stay out of float8: add "
                f"{missing} to [quantize.linear.float8] filter_fqns"
            )

    def convert(self, model: nn.Module) -> None:
        convert_model(model, self.coda, self.backend)

    def post_optimizer_hook(self, model: nn.Module | list[nn.Module]) -> None:
        pass


def convert_model(model: nn.Module, coda: Coda, backend: str) -> None:
    """Convert a TorchTitan llama3 ``Transformer`` in place (what the converter runs).

    ``backend`` is a resolved backend (``resolve_backend(coda.backend)``).
    """
    if not isinstance(model, Transformer):
        raise TypeError(
            f"the coda converter handles TorchTitan llama3 Transformer models, "
            f"got {type(model).__name__}"
        )
    if coda.fuse_norm_qkv_rope or coda.fuse_wo_residual or coda.fuse_norm_swiglu_mlp:
        for block in model.layers.values():
            CodaTransformerBlock.convert(block, coda, backend)
    if coda.fuse_norm_output_loss:
        model.norm.__class__ = DeferredRMSNorm
        model.output.__class__ = FusedLMHead
        model.output.backend = backend
        model.output.chunk_tokens = coda.loss_chunk_tokens
    on = [name for name in ("norm_qkv_rope", "wo_residual", "norm_swiglu_mlp", "norm_output_loss")
          if getattr(coda, f"fuse_{name}")]
    logger.info(
        f"CODA: converted {len(model.layers)} blocks, fusions {on or 'none'}, backend {backend}"
    )


register_model_converter(CodaConverter, "coda")
