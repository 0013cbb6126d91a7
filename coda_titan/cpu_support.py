"""Run TorchTitan 0.2.2's trainer on a machine without a GPU.

The trainer picks its device through ``torchtitan.tools.utils.device_type`` /
``device_module``, which fall back to ``"cuda"`` / ``torch.cuda`` when no
accelerator exists, and several modules copied those names at import. On a
CPU-only machine (CI, laptops) ``enable()`` points all of them at the host: a
``cpu`` device and a small stand-in for the ``torch.cuda`` calls the trainer
makes (set_device, memory statistics, synchronize). Peak memory is reported as
the process's peak resident set size.

Only ``coda_titan.train`` calls ``enable()``, and only when CUDA is absent:
nothing here runs on a GPU machine.
"""

import os
import platform
import resource
from types import SimpleNamespace

import torch

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


def enable() -> None:
    """Point TorchTitan's device selection at the CPU. Refuses when CUDA exists."""
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
