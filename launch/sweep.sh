#!/usr/bin/env bash
# Run a W&B sweep (configs/sweeps/*.yaml): create it on the W&B server, then start agents here.
#
#   launch/sweep.sh configs/sweeps/generator_bayes.yaml --agents 4 --count 5     # 4 agents, 5 runs each
#   SWEEP_ID=me/pdiff/abc123 launch/sweep.sh --agents 8                           # join an existing sweep
#   launch/sweep.sh configs/sweeps/noise_grid.yaml --local                        # no server: pdiff sweep --local
#   launch/sweep.sh configs/sweeps/noise_grid.yaml --dry-run
#
# Run from the folder whose outputs/ holds the dataset the sweep reads (e.g. after `pdiff collect
# task=digits`); trials run the installed pdiff (`accelerate launch -m pdiff.train`), so any folder works. With several GPUs, agent i sees only GPU i
# (CUDA_VISIBLE_DEVICES), so the agents' trials run side by side.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<USAGE
Usage: launch/sweep.sh [options] [SWEEP_FILE] [key=value overrides (--local only)...]

Options (environment variable in brackets):
      --agents N          agents to start on this machine [AGENTS] (default: 1)
      --count N           runs per agent (default: until the sweep ends) / trials with --local [COUNT]
      --project NAME      W&B project [WANDB_PROJECT] (default: the sweep file's, else pdiff)
      --entity NAME       W&B entity [WANDB_ENTITY]
      --sweep-id ID       join this sweep instead of creating one [SWEEP_ID]
      --local             no W&B server: trials run here with the sweeps engine (pdiff sweep --local)
      --dry-run           print the resolved commands instead of running them [DRY_RUN=1]
  -h, --help              this text
Executables: WANDB, PDIFF (default: wandb, pdiff).
USAGE
}

AGENTS="${AGENTS:-1}"
COUNT="${COUNT:-}"
SWEEP_ID="${SWEEP_ID:-}"
LOCAL=0
sweep_file=""
overrides=()
while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        --agents) AGENTS="${2:?$1 needs a value}"; shift ;;
        --count) COUNT="${2:?$1 needs a value}"; shift ;;
        --project) export WANDB_PROJECT="${2:?$1 needs a value}"; shift ;;
        --entity) export WANDB_ENTITY="${2:?$1 needs a value}"; shift ;;
        --sweep-id) SWEEP_ID="${2:?$1 needs a value}"; shift ;;
        --local) LOCAL=1 ;;
        --) shift; overrides+=("$@"); break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *.yaml | *.yml) [[ -z "$sweep_file" ]] || die "one sweep file at a time"; sweep_file="$1" ;;
        *) overrides+=("$1") ;;
    esac
    shift
done
is_uint "$AGENTS" && ((AGENTS > 0)) || die "--agents must be a positive number, got $AGENTS"
[[ -z "$COUNT" ]] || is_uint "$COUNT" || die "--count must be a number, got $COUNT"

if ((LOCAL)); then
    [[ -n "$sweep_file" ]] || die "--local needs a sweep file"
    cmd=("$PDIFF" sweep "$sweep_file" --local)
    [[ -n "$COUNT" ]] && cmd+=(--count "$COUNT")
    [[ "$DRY_RUN" == 1 ]] && cmd+=(--dry-run)   # pdiff prints the trials' commands itself
    DRY_RUN=0 run "${cmd[@]}" "${overrides[@]}"
    exit
fi
((${#overrides[@]} == 0)) || die "overrides (${overrides[*]}) apply to --local only: on a W&B server, set constants in the sweep file"

if [[ -z "$SWEEP_ID" ]]; then
    [[ -n "$sweep_file" ]] || die "give a sweep file to create a sweep, or --sweep-id to join one"
    create=("$WANDB" sweep)
    [[ -n "${WANDB_PROJECT:-}" ]] && create+=(--project "$WANDB_PROJECT")
    [[ -n "${WANDB_ENTITY:-}" ]] && create+=(--entity "$WANDB_ENTITY")
    create+=("$sweep_file")
    if [[ "$DRY_RUN" == 1 ]]; then
        run "${create[@]}"
        SWEEP_ID="ENTITY/PROJECT/SWEEP_ID"
    else
        out="$(run "${create[@]}" 2>&1)" || { echo "$out" >&2; die "wandb sweep failed"; }
        echo "$out" >&2
        # wandb prints "Run sweep agent with: wandb agent ENTITY/PROJECT/ID" (colour codes stripped).
        SWEEP_ID="$(sed 's/\x1b\[[0-9;]*m//g' <<<"$out" | sed -n 's/.*wandb agent \([^ ]*\).*/\1/p' | tail -n 1)"
        [[ -n "$SWEEP_ID" ]] || die "could not read the sweep id from wandb's output (above)"
        log "created sweep $SWEEP_ID"
    fi
fi

gpus="$(count_gpus)"
agent=("$WANDB" agent)
[[ -n "$COUNT" ]] && agent+=(--count "$COUNT")
agent+=("$SWEEP_ID")
pids=()
for ((i = 0; i < AGENTS; i++)); do
    prefix=()
    ((gpus > 1 && AGENTS > 1)) && prefix=(env "CUDA_VISIBLE_DEVICES=$((i % gpus))")
    if [[ "$DRY_RUN" == 1 ]]; then
        run "${prefix[@]}" "${agent[@]}"
    else
        run "${prefix[@]}" "${agent[@]}" &
        pids+=("$!")
    fi
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=$?
done
exit "$status"
