"""``python -m coda_titan.train --job.config_file X.toml [overrides]``.

TorchTitan's own trainer, after two things it does not do: the ``[coda]``
section of the TOML is checked first (unknown keys are named together with
the allowed ones), and on a machine without CUDA ``cpu_support`` points the
trainer at the CPU. ``scripts/train.sh`` launches this under torchrun.
"""

import sys

import torch


def _config_file(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        key, _, value = arg.partition("=")
        if key in ("--job.config_file", "--job.config-file"):
            return value or (args[i + 1] if i + 1 < len(args) else None)
    return None


def check_toml(path: str) -> None:
    """Fail early, with the allowed keys, on a bad ``[coda]`` section."""
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib

    from .config import check_coda_section

    with open(path, "rb") as f:
        config = tomllib.load(f)
    if "coda" in config:
        check_coda_section(config["coda"])


def main(args: list[str] | None = None) -> None:
    args = sys.argv[1:] if args is None else args
    path = _config_file(args)
    if path is not None:
        check_toml(path)
    if not torch.cuda.is_available():
        from . import cpu_support

        cpu_support.enable()
    from torchtitan.train import Trainer
    from torchtitan.train import main as torchtitan_main

    sys.argv = [sys.argv[0], *args]
    torchtitan_main(Trainer)


if __name__ == "__main__":
    main()
