"""Where the benchmark scripts write: ``<out>/<name>_<gpu>.{json,md}``, each with
the GPU name, the versions and the command that produced it."""

import json
import platform
import sys
from pathlib import Path

import torch


def write_results(out: str, name: str, title: str, records: list[dict], table: list[str],
                  **extra) -> None:
    """The records (and any ``extra`` entries) as JSON, and a Markdown page:
    ``title`` (the GPU appended), the metadata, then the ``table`` lines."""
    import quack

    gpu = torch.cuda.get_device_name()
    meta = dict(gpu=gpu, torch=torch.__version__, cuda=torch.version.cuda, quack=quack.__version__,
                python=platform.python_version(), command="python " + " ".join(sys.argv))
    tag = gpu.split()[1].lower() if gpu.startswith("NVIDIA") else gpu.replace(" ", "_").lower()
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{name}_{tag}.json").write_text(json.dumps(dict(meta=meta, records=records, **extra),
                                                          indent=1))
    lines = [f"# {title}, {gpu}", "", "```", json.dumps(meta, indent=1), "```", "", *table]
    (path / f"{name}_{tag}.md").write_text("\n".join(lines) + "\n")
