#!/usr/bin/env bash
# Launch a TorchTitan training run from a TOML config, with coda_titan loaded:
#   scripts/train.sh CONFIG.toml [--section.key=value ...]
# One process per visible GPU (one on a CPU-only machine). Runs from the
# repository root, as TorchTitan's run_train.sh does, so the relative paths in
# configs/ (tokenizer, dump folder) resolve wherever it is called from.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG.toml [--section.key=value ...]" >&2
  exit 2
fi
config="$(realpath "$1")"
shift
cd "$(dirname "$(realpath "$0")")/.."
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count() or 1)')
exec torchrun --standalone --nproc_per_node="${NGPU:-$ngpu}" \
  -m coda_titan.train --job.config_file "$config" "$@"
