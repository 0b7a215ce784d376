# Shared by the launchers in this folder; `source` it, don't run it.
#
# Every launcher prints each command it runs as one shell-quoted line starting with "+ ", so a dry run
# (--dry-run or DRY_RUN=1) shows the fully resolved commands and can be copied or checked by a test.

REPO_ROOT="${PDIFF_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
DRY_RUN="${DRY_RUN:-0}"
ACCELERATE="${ACCELERATE:-accelerate}"   # the executables, overridable (e.g. a virtualenv's bin/accelerate)
PDIFF="${PDIFF:-pdiff}"
WANDB="${WANDB:-wandb}"

# run CMD...: print it, then run it unless this is a dry run.
run() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    if [[ "$DRY_RUN" != 1 ]]; then
        "$@"
    fi
}

log() { echo "$(basename "$0"): $*" >&2; }
die() { log "error: $*"; exit 2; }

# GPUs on this machine: $NUM_GPUS if set, else what nvidia-smi lists, else 0.
count_gpus() {
    if [[ -n "${NUM_GPUS:-}" ]]; then
        echo "$NUM_GPUS"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi -L | grep -c '^GPU'
    else
        echo 0
    fi
}

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
