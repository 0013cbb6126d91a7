"""Run TorchTitan 0.2.2's trainer on a machine without a GPU.

The trainer picks its device through ``torchtitan.tools.utils.device_type`` /
``device_module``, which fall back to ``"cuda"`` / ``torch.cuda`` when no
accelerator exists, and several modules copied those names at import. On a
CPU-only machine (CI, laptops) ``enable()`` points all of them at the host: a
``cpu`` device and a small stand-in for the ``torch.cuda`` calls the trainer
makes (set_device, memory statistics, synchronize). Peak memory is reported as
the process's peak resident set size.

It also keeps the CPU run's log to what a user can act on: MFU needs a
device's peak FLOPS, which TorchTitan knows for GPUs only (it runs ``lspci``,
then warns and assumes an A100), so on the CPU MFU is left out of the console
line and of TensorBoard/wandb instead of reading 0.00%; the model-args dump is
cut to its first line; TorchTitan's lines about peak FLOPS, sleeping for other
ranks and the tokenizer folder's missing safetensors index (which only
HF-format checkpoints read) are dropped. ``mixed_precision_param = "float32"``
runs without autocast: CPU autocast refuses float32 with a warning.

``has_native_bf16()`` decides the CPU precision (``coda_titan.train``): without
AVX512-BF16 or AMX, PyTorch emulates bf16 matmuls, and TorchTitan's bf16
autocast makes the debug model ~18x slower than float32.

Only ``coda_titan.train`` calls ``enable()``, and only when CUDA is absent:
nothing here runs on a GPU machine.
"""

import contextlib
import logging
import math
import os
import platform
import re
import resource
import warnings
from types import SimpleNamespace

import torch
from torchtitan.components import metrics
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools import utils
from torchtitan.tools.logging import logger

# Modules of TorchTitan 0.2.2 that bind device_type / device_module at import.
_PATCHED_MODULES = (
    "torchtitan.tools.utils",
    "torchtitan.tools.profiling",
    "torchtitan.components.metrics",
    "torchtitan.distributed.utils",
    "torchtitan.distributed.parallel_dims",
)


class HostDeviceModule:
    """The subset of ``torch.cuda``'s interface TorchTitan's trainer uses, for the CPU."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def set_device(device) -> None:
        pass

    @staticmethod
    def synchronize(device=None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        pass

    @staticmethod
    def get_device_name(device=None) -> str:
        return f"CPU ({platform.processor() or platform.machine()})"

    @staticmethod
    def get_device_properties(device=None) -> SimpleNamespace:
        return SimpleNamespace(total_memory=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

    @staticmethod
    def memory_stats(device=None) -> dict[str, int]:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"active_bytes.all.peak": peak, "reserved_bytes.all.peak": peak}


def has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls in hardware (AVX512-BF16 or AMX)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


MFU = "mfu(%)"


class HostLogFilter(logging.Filter):
    """TorchTitan's log on the CPU, without its GPU-only and multi-rank lines."""

    DROPPED = (
        "Peak FLOPS used for computing MFU",
        "Sleeping 2 seconds for other ranks",
        "model.safetensors.index.json not found",
    )
    MODEL_ARGS = re.compile(r"^(Building \S+ \S+?)\s*with \{.*", re.S)
    MFU_FIELD = re.compile(r"\s+(\x1b\[[0-9;]*m)?mfu: \S+%")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.DROPPED):
            return False
        record.msg = self.MFU_FIELD.sub("", self.MODEL_ARGS.sub(r"\1", message))
        record.args = ()
        return True


class MetricsWithoutMFU(metrics.BaseLogger):
    """A TorchTitan metric logger (TensorBoard, wandb) that leaves MFU out."""

    def __init__(self, inner):
        self.inner = inner

    def log(self, values: dict, step: int) -> None:
        self.inner.log({k: v for k, v in values.items() if k != MFU}, step)

    def close(self) -> None:
        self.inner.close()


def _no_autocast_for_float32(maybe_enable_amp):
    """``mixed_precision_param = "float32"`` means no autocast: CPU autocast
    refuses float32 with a warning, and TorchTitan would log that AMP is on."""

    def wrapper(parallel_dims, mixed_precision_param, device_type):
        if mixed_precision_param == "float32":
            return contextlib.nullcontext()
        return maybe_enable_amp(parallel_dims, mixed_precision_param, device_type)

    return wrapper


def enable() -> None:
    """Point TorchTitan's device selection at the CPU and keep its log to the
    CPU's lines. Refuses when CUDA exists."""
    if torch.cuda.is_available():
        raise RuntimeError("cpu_support.enable() is for machines without a CUDA device")
    import importlib

    host = HostDeviceModule()
    for name in _PATCHED_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "device_type"):
            module.device_type = "cpu"
        if hasattr(module, "device_module"):
            module.device_module = host

    utils.get_peak_flops = lambda device_name: math.nan
    build_metric_logger = metrics._build_metric_logger
    metrics._build_metric_logger = lambda *args, **kwargs: MetricsWithoutMFU(
        build_metric_logger(*args, **kwargs))
    dist_utils.maybe_enable_amp = _no_autocast_for_float32(dist_utils.maybe_enable_amp)
    logger.addFilter(HostLogFilter())
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
