"""Name and group wandb runs so two arms of an A/B land side by side.

TorchTitan's ``WandBLogger`` reads ``WANDB_RUN_NAME``/``WANDB_RUN_GROUP`` (and
``WANDB_PROJECT``, ``WANDB_MODE``) from the environment and logs the whole job
config, ``[coda]`` included. Unless the user set them, the run is named after
its arm (``baseline``, ``baseline-fp8``, ``coda-bf16``, ``coda-fp8`` for CODA
with TorchTitan's float8, ``coda-fp8-<recipe>`` for ``[coda] fp8 = "coda"``) and
flavor, and grouped by what must match for a fair comparison: model flavor,
sequence length, batch and steps. With no wandb credentials on the machine
(no ``WANDB_API_KEY``, no api.wandb.ai entry in ``~/.netrc``) and no
``WANDB_MODE`` set, the run is logged offline under the dump folder instead of
failing; ``wandb sync`` uploads it later. Nothing here imports wandb.
"""

import os

from torchtitan.tools.logging import logger

from .converter import FLOAT8_CONVERTER


def arm_name(job_config) -> str:
    converters = job_config.model.converters
    fp8 = FLOAT8_CONVERTER in converters
    if "coda" in converters:
        coda = job_config.coda
        if coda.fp8 == "coda":
            return f"coda-fp8-{coda.fp8_recipe}"
        return "coda-fp8" if fp8 else "coda-bf16"
    return "baseline-fp8" if fp8 else "baseline"


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    return os.path.exists(netrc) and "api.wandb.ai" in open(netrc).read()


def configure_wandb_run(job_config) -> None:
    model, training = job_config.model, job_config.training
    if "WANDB_MODE" not in os.environ and not _has_wandb_credentials():
        os.environ["WANDB_MODE"] = "offline"
        logger.info("wandb: no credentials found, logging offline (upload later with `wandb sync`)")
    os.environ.setdefault("WANDB_PROJECT", "coda-titan")
    os.environ.setdefault("WANDB_RUN_NAME", f"{arm_name(job_config)}-{model.flavor}")
    os.environ.setdefault(
        "WANDB_RUN_GROUP",
        f"{model.name}-{model.flavor}-seq{training.seq_len}"
        f"-bs{training.local_batch_size}-steps{training.steps}",
    )


_BLOCK = 32768
_HEADER = 7  # ":W&B", magic 0xBEE1, version byte
_RECORD_HEADER = 7  # crc32, length (uint16 LE), type


def read_wandb_records(path: str):
    """Protobuf ``Record``s of a ``run-*.wandb`` file (offline or synced run).

    The file is a LevelDB-style log: 32 KiB blocks of chunks, each with a
    7-byte header; a record is one FULL chunk or FIRST, MIDDLE..., LAST.
    """
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file")
    pos, pending = _HEADER, b""
    while pos + _RECORD_HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _RECORD_HEADER:
            pos += _BLOCK - pos % _BLOCK
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + _RECORD_HEADER : pos + _RECORD_HEADER + length]
        pos += _RECORD_HEADER + length
        if kind == 0:
            break
        pending += chunk
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_wandb_history(path: str) -> tuple[dict, list[dict]]:
    """``(run info, history rows)`` of a wandb run file; rows map metric -> value."""
    import json

    config, rows = {}, []
    info = {"config": config}
    for record in read_wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update((item.key, json.loads(item.value_json)) for item in updates)
            if kind == "run":
                info.update(name=record.run.display_name, group=record.run.run_group)
        elif kind == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                 for item in record.history.item}
            )
    return info, rows
