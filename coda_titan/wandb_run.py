"""Name and group wandb runs so two arms of an A/B land side by side.

TorchTitan's ``WandBLogger`` reads ``WANDB_RUN_NAME``/``WANDB_RUN_GROUP`` (and
``WANDB_PROJECT``, ``WANDB_MODE``) from the environment and logs the whole job
config, ``[coda]`` included. Unless the user set them, the run is named after
its arm (``baseline``, ``baseline-fp8``, ``coda-bf16``, ``coda-fp8``) and
flavor, and grouped by what must match for a fair comparison: model flavor,
sequence length, batch and steps. Nothing here imports wandb.
"""

import os

from .converter import FLOAT8_CONVERTER


def arm_name(job_config) -> str:
    converters = job_config.model.converters
    fp8 = FLOAT8_CONVERTER in converters
    if "coda" in converters:
        return "coda-fp8" if fp8 else "coda-bf16"
    return "baseline-fp8" if fp8 else "baseline"


def configure_wandb_run(job_config) -> None:
    model, training = job_config.model, job_config.training
    os.environ.setdefault("WANDB_PROJECT", "coda-titan")
    os.environ.setdefault("WANDB_RUN_NAME", f"{arm_name(job_config)}-{model.flavor}")
    os.environ.setdefault(
        "WANDB_RUN_GROUP",
        f"{model.name}-{model.flavor}-seq{training.seq_len}"
        f"-bs{training.local_batch_size}-steps{training.steps}",
    )
