"""``python -m coda_titan.train --job.config_file X.toml [overrides]``, what
``scripts/train.sh`` runs.

TorchTitan's own trainer, after what it does not do:

* The config is checked before anything is built, and a bad one fails in one
  line, ``error: ...``, naming the key and the fix: TOML syntax; a ``[coda]``
  section or ``"coda"`` converter without ``[job] custom_config_module`` (which
  TorchTitan reports as invalid field names); unknown ``[coda]`` keys, with the
  allowed ones; the command line (TorchTitan's parser draws a box); and
  ``--training.seq_len`` against the model flavor's ``max_seq_len`` (TorchTitan
  only warns, then builds RoPE tables for the longer length).
* A single process (no ``LOCAL_RANK`` from torchrun) runs without a launcher.
* On a machine without CUDA, ``cpu_support`` points the trainer at the CPU,
  which trains in float32 unless it has native bf16 or the config asks for
  ``mixed_precision_param`` itself.
* Any other failure prints its traceback, then ``error: <type>: <message>`` as
  the last line; under torchrun every rank also appends that line to
  ``$CODA_ERROR_FILE``, for ``scripts/train.sh`` to repeat after torchrun's
  report. A checkpoint that fails to load (DCP's ``CheckpointException``, a
  ``BaseException`` carrying each rank's traceback) ends in its root error.
* A ``delayed`` FP8 run resumes a checkpoint without amax histories (another
  recipe's, a bf16 run's) with empty ones.

``--help`` without a config lists the ``[coda]`` options; with one, every option.
"""

import contextlib
import importlib
import io
import os
import re
import sys
import tomllib
import traceback
from collections.abc import Sequence

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torchtitan.tools.logging import init_logger, logger
from torchtitan.train import Trainer
from torchtitan.train import main as torchtitan_main

PROG = "scripts/train.sh CONFIG.toml"
CONFIG_MODULE = "coda_titan.config"


class ConfigError(ValueError):
    """A bad config or command line: reported in one line, without a traceback."""


def _cli_value(args: Sequence[str], key: str) -> str | None:
    """The value of ``--section.key`` (either spelling, ``=`` or separate) in ``args``."""
    names = {f"--{key}", f"--{key.replace('_', '-')}"}
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in names:
            return value if eq else (args[i + 1] if i + 1 < len(args) else None)
    return None


def load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None


def check_toml(path: str, args: Sequence[str] = ()) -> None:
    """Fail on what TorchTitan would reject without saying the fix: TOML syntax,
    CODA without its config module, unknown or bad ``[coda]`` keys."""
    from .config import check_coda_section

    config = load_toml(path)
    uses_coda = "coda" in config or "coda" in config.get("model", {}).get("converters", [])
    module = (_cli_value(args, "job.custom_config_module")
              or config.get("job", {}).get("custom_config_module"))
    if uses_coda and not module:
        raise ConfigError(
            f'{path} uses CODA (a [coda] section or converters = ["coda"]) without its config '
            f'module: add custom_config_module = "{CONFIG_MODULE}" under [job]'
        )
    if "coda" in config:
        check_coda_section(config["coda"])


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def parser_message(output: str) -> str:
    """The message of TorchTitan's command-line parser (tyro) error box as one
    line: the box's first section, between its first two rules."""
    lines = [_ANSI.sub("", line).strip(" │╭╮╰╯├┤") for line in output.splitlines()]
    rules = [i for i, line in enumerate(lines) if line and set(line) <= set("-─")]
    body = lines[rules[0] + 1:rules[1]] if len(rules) > 1 else lines
    return " ".join(" ".join(body).split())


def parse_config(args: list[str]):
    """TorchTitan's config from TOML and command line; its errors as ConfigError.

    TorchTitan's ``main`` parses again: this parse only checks (its console
    output is shown for ``--help`` and summarized for an error)."""
    from torchtitan.config import ConfigManager

    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            return ConfigManager().parse_args(args)
    except SystemExit as e:
        if e.code:
            raise ConfigError(
                f"{parser_message(output.getvalue())} ({PROG} --help lists the options)"
            ) from None
        print(output.getvalue(), end="")
        raise


def check_seq_len(config) -> None:
    """``--training.seq_len`` within the model flavor's ``max_seq_len``."""
    from torchtitan.protocols.train_spec import get_train_spec

    model = config.model
    flavors = get_train_spec(model.name).model_args
    if model.flavor not in flavors:
        raise ConfigError(
            f"[model] flavor = {model.flavor!r} is not a flavor of {model.name!r}; "
            f"flavors: {', '.join(flavors)}"
        )
    limit = getattr(flavors[model.flavor], "max_seq_len", None)
    if limit is not None and config.training.seq_len > limit:
        raise ConfigError(
            f"[training] seq_len = {config.training.seq_len} is above the maximum of "
            f"{model.name} {model.flavor!r} (max_seq_len = {limit}); use seq_len <= {limit}"
        )


def check(args: list[str]) -> None:
    """Everything that can be checked before TorchTitan builds anything."""
    path = _cli_value(args, "job.config_file")
    if path is not None:
        check_toml(path, args)
    config = parse_config(args)
    if config.experimental.custom_import:  # registers its train specs, as the Trainer does
        importlib.import_module(config.experimental.custom_import)
    check_seq_len(config)


def coda_help() -> None:
    """The ``[coda]`` options, as TorchTitan's parser lists them."""
    import tyro

    from .config import JobConfig

    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.suppress(SystemExit):
        tyro.cli(JobConfig, args=["--help"], prog=PROG)
    text = output.getvalue()
    # From the [coda] group on: the usage line and -h are scripts/train.sh's.
    print(text[text.rfind("\n", 0, text.index("coda options")) + 1:], end="")


def cpu_precision(job_config) -> None:
    """Train in float32 on a CPU without native bf16, unless the config asks for
    ``mixed_precision_param`` itself (in its TOML or on the command line)."""
    from . import cpu_support

    if cpu_support.has_native_bf16():
        return
    training = job_config.training
    toml = load_toml(job_config.job.config_file) if job_config.job.config_file else {}
    if ("mixed_precision_param" in toml.get("training", {})
            or _cli_value(sys.argv[1:], "training.mixed_precision_param") is not None):
        if training.mixed_precision_param == "bfloat16":
            logger.info("CPU without native bf16 (AVX512-BF16 or AMX): bf16 autocast is "
                        "emulated, as [training] mixed_precision_param asks")
        return
    training.mixed_precision_param = "float32"
    logger.info("CPU without native bf16 (AVX512-BF16 or AMX): training in float32, as bf16 "
                "would be emulated (--training.mixed_precision_param=bfloat16 forces it)")


class CodaTrainer(Trainer):
    """TorchTitan's trainer, in float32 on a CPU without native bf16, loading
    checkpoints written without FP8 amax histories (``without_absent_histories``)."""

    def __init__(self, job_config):
        if not torch.cuda.is_available():
            cpu_precision(job_config)
        super().__init__(job_config)
        self.checkpointer.dcp_load = without_absent_histories(self.checkpointer.dcp_load)


def without_absent_histories(dcp_load):
    """TorchTitan's DCP load, for a ``delayed`` FP8 run resuming a checkpoint that
    holds no amax histories (written by a bf16, ``torchao`` or ``tensorwise`` run):
    the histories are left out of what is loaded, rather than DCP failing on their
    missing keys, and stay empty, so the first step scales ``tensorwise`` and fills
    them, as a fresh delayed run does. A checkpoint holding some but not all is
    still an error (another model)."""

    def load(state_dict, checkpoint_id, from_hf, from_quantized):
        from .layers.block import HISTORY_BUFFER  # not at import: the launcher starts light

        histories = [key for key in state_dict if key.endswith(f".{HISTORY_BUFFER}")]
        if histories and not from_hf:
            saved = FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
            if not any(key.endswith(f".{HISTORY_BUFFER}") for key in saved):
                logger.warning(f"Checkpoint {checkpoint_id} holds no FP8 amax histories (its run "
                               f"did not scale delayed): they start empty, and each block's "
                               f"first step scales tensorwise")
                state_dict = {k: v for k, v in state_dict.items() if k not in histories}
        dcp_load(state_dict, checkpoint_id=checkpoint_id, from_hf=from_hf,
                 from_quantized=from_quantized)

    return load


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def error_line(error: BaseException) -> str:
    """``<type>: <message>`` of a failure after start-up; for a checkpoint that did
    not load, the root error (the last line of the first rank's traceback)."""
    if isinstance(error, CheckpointException):
        return str(error).strip().splitlines()[-1]
    return f"{type(error).__name__}: {first_line(error)}"


def fail(message: str, code: int) -> None:
    """The last line of a failed launch; also for scripts/train.sh under torchrun."""
    line = f"error: {message}"
    print(line, file=sys.stderr, flush=True)
    if os.environ.get("CODA_ERROR_FILE"):
        with open(os.environ["CODA_ERROR_FILE"], "a") as f:
            f.write(line + "\n")
    sys.exit(code)


def main() -> None:
    # TorchTitan's main parses sys.argv[1:] as of its import: the launch command line.
    args = sys.argv[1:]
    sys.argv[0] = PROG
    if _cli_value(args, "job.config_file") is None and {"-h", "--help"} & set(args):
        coda_help()
        return
    init_logger()
    if "LOCAL_RANK" not in os.environ:  # not under torchrun: one process, rank 0 of 1
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    try:
        check(args)
    except ValueError as e:
        fail(first_line(e), 2)
    except Exception as e:  # e.g. a custom_import that does not import
        traceback.print_exc()
        fail(f"{type(e).__name__}: {first_line(e)}", 2)
    if not torch.cuda.is_available():
        from . import cpu_support

        cpu_support.enable()
    try:
        torchtitan_main(CodaTrainer)
    except (Exception, CheckpointException) as e:
        traceback.print_exc()
        fail(error_line(e), 1)


if __name__ == "__main__":
    main()
