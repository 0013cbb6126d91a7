#!/usr/bin/env bash
# Launch a TorchTitan training run from a TOML config, with coda_titan loaded.
# Run with --help for the usage. Runs from the repository root, as TorchTitan's
# run_train.sh does, so the relative paths in configs/ (tokenizer, dump folder)
# resolve wherever it is called from. The console output is also written to
# <dump folder>/train.log (rewritten by every launch), which compare_runs.py reads.
set -euo pipefail
usage="usage: scripts/train.sh CONFIG.toml [--section.key=value ...]"
repo="$(cd "$(dirname "$(realpath "$0")")/.." && pwd)"
case "${1:-}" in
  "")
    echo "$usage (scripts/train.sh --help for the options)" >&2
    exit 2
    ;;
  -h | --help)
    cat <<EOF
$usage

Trains with TorchTitan's trainer: one process per GPU, or one process on the
CPU (PyTorch reference path; float32 unless the CPU has native bf16).
Any TorchTitan or [coda] key of the config can be overridden on the command
line; scripts/train.sh CONFIG.toml --help lists them all. NGPU=N sets the number
of processes. The console output is also written to <dump folder>/train.log.

EOF
    cd "$repo"
    exec python3 -m coda_titan.train --help
    ;;
esac
if [ ! -f "$1" ]; then
  echo "error: config file not found: $1 (the configs are in $repo/configs)" >&2
  exit 2
fi
config="$(realpath "$1")"
shift
cd "$repo"

# The dump folder as TorchTitan resolves it (command line over TOML over its
# default), for the console log; none for --help, which trains nothing.
dump_folder="$(python3 - "$config" "$@" <<'EOF'
import sys
import tomllib


def dump_folder(config, args):
    if "-h" in args or "--help" in args:
        return ""
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if key in ("--job.dump_folder", "--job.dump-folder"):
            return value if eq else args[i + 1] if i + 1 < len(args) else ""
    try:
        with open(config, "rb") as f:
            return tomllib.load(f).get("job", {}).get("dump_folder", "./outputs")
    except tomllib.TOMLDecodeError:
        return ""  # coda_titan.train reports the TOML error


print(dump_folder(sys.argv[1], sys.argv[2:]))
EOF
)"
log=/dev/null
if [ -n "$dump_folder" ]; then
  mkdir -p "$dump_folder"
  log="$dump_folder/train.log"
fi

# One process per visible GPU. Without nvidia-smi there is no GPU: skip the torch import.
if command -v nvidia-smi > /dev/null; then
  nproc="${NGPU:-$(python3 -c 'import torch; print(torch.cuda.device_count() or 1)')}"
else
  nproc="${NGPU:-1}"
  # OpenMP threads spin while they wait for each other. Where the cores are
  # shared (CI neighbours, a second run), a spinning thread holds the core its
  # partner needs: a debug-model step took 5 s instead of 0.3 s. Waiting
  # passively costs ~0.1 s a step on an idle 2-core machine.
  export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
fi
export PYTHONUNBUFFERED=1
status=0
if [ "$nproc" -gt 1 ]; then
  # torchrun ends a failed run with its own report of every rank; each rank also
  # writes its one-line error to CODA_ERROR_FILE, and the first is repeated last.
  # Only rank LOG_RANK (default 0) prints: every rank logs the same step lines.
  CODA_ERROR_FILE="$(mktemp)"
  export CODA_ERROR_FILE
  trap 'rm -f "$CODA_ERROR_FILE"' EXIT
  torchrun --standalone --nproc_per_node="$nproc" --local-ranks-filter "${LOG_RANK:-0}" \
    --role rank --tee 3 -m coda_titan.train \
    --job.config_file "$config" "$@" 2>&1 | tee "$log" || status=$?
  if [ "$status" -ne 0 ] && [ -s "$CODA_ERROR_FILE" ]; then
    head -n 1 "$CODA_ERROR_FILE" | tee -a "$log" >&2
  fi
else
  # A single process needs no launcher; its error line is the last one printed.
  python3 -m coda_titan.train --job.config_file "$config" "$@" 2>&1 | tee "$log" || status=$?
fi
exit "$status"
