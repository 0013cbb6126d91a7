"""The ``coda_llama3`` train spec: TorchTitan's llama3, plus 1B and 3B flavors and a
loss that accepts the fused LM head.

Why a train spec: TorchTitan 0.2.2's trainer calls ``loss_fn(pred, labels)``
on whatever the model returns, and the loss comes from the train spec. With
``fuse_norm_output_loss`` the converted model returns an ``LMHeadInput``
instead of logits; this spec's loss computes the summed cross-entropy from it
with the chunked fused op (no M x V logits), and for plain logits it is
TorchTitan's own ``cross_entropy_loss`` (compiled when ``[compile]`` asks), so
baseline runs use this spec unchanged. Its HF state-dict adapter leaves the
``delayed`` FP8 recipe's amax histories out (run state, not weights: a run
started from HF weights fills them afresh). Everything else is llama3's.
"""

from dataclasses import replace

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.components.metrics import build_metrics_processor
from torchtitan.models.llama3 import (
    Llama3StateDictAdapter, TransformerModelArgs, get_train_spec, llama3_args)
from torchtitan.protocols.train_spec import register_train_spec

from .layers import LMHeadInput
from .layers.block import HISTORY_BUFFER
from .wandb_run import configure_wandb_run

CODA_LLAMA3 = "coda_llama3"
CODA_TRAIN_SPECS = frozenset({CODA_LLAMA3})

coda_llama3_args = {
    **llama3_args,
    # The CODA paper's 1B: F = 8192.
    "1B": TransformerModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim_multiplier=1.5,
        multiple_of=1024,
        vocab_size=128256,
        rope_theta=500000,
    ),
    # LLaMA-3.2 3B's dims (F = 8192; untied output, no RoPE frequency scaling).
    "3B": TransformerModelArgs(
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        multiple_of=256,
        vocab_size=128256,
        rope_theta=500000,
    ),
    "debugmodel_gqa": TransformerModelArgs(
        dim=256, n_layers=6, n_heads=16, n_kv_heads=4, vocab_size=2048, rope_theta=500000
    ),
}


class CodaLlama3StateDictAdapter(Llama3StateDictAdapter):
    """TorchTitan's llama3 HF adapter, without the blocks' ``fp8_amax_history``
    (HF has no name for it; ``from_hf`` then leaves it as it is)."""

    def to_hf(self, state_dict):
        return super().to_hf({key: value for key, value in state_dict.items()
                              if not key.endswith(f".{HISTORY_BUFFER}")})


def build_coda_loss(job_config, **kwargs):
    """Summed cross-entropy from logits or from a fused ``LMHeadInput``."""
    logits_loss = build_cross_entropy_loss(job_config, **kwargs)

    def loss_fn(pred, labels):
        if isinstance(pred, LMHeadInput):
            return pred.loss(labels)
        return logits_loss(pred, labels)

    return loss_fn


def build_coda_metrics_processor(job_config, parallel_dims, model_args=None, tag=None):
    """TorchTitan's metrics processor, with the wandb run named and grouped."""
    if job_config.metrics.enable_wandb:
        configure_wandb_run(job_config)
    return build_metrics_processor(job_config, parallel_dims, model_args, tag)


def register_coda_train_spec() -> None:
    register_train_spec(
        CODA_LLAMA3,
        replace(
            get_train_spec(),
            model_args=coda_llama3_args,
            build_loss_fn=build_coda_loss,
            build_metrics_processor_fn=build_coda_metrics_processor,
            state_dict_adapter=CodaLlama3StateDictAdapter,
        ),
    )
