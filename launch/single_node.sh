#!/usr/bin/env bash
# Run a pdiff stage on every GPU of one machine with `accelerate launch` (DDP, one process per GPU).
#
#   launch/single_node.sh task=digits train.report_to=wandb           # pdiff/train.py on all GPUs
#   NUM_GPUS=2 launch/single_node.sh --dry-run task=cifar100_resnet18 train=paper
#   launch/single_node.sh --module pdiff.collect task=digits           # one checkpoint trajectory per process
#
# Without a GPU it falls back to CPU processes that talk over gloo, for testing: ACCELERATE_USE_CPU=1
# plus --multi_gpu, because `accelerate launch --cpu --num_processes 2` silently starts a single process.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<USAGE
Usage: launch/single_node.sh [options] [--] [key=value overrides...]

Options (environment variable in brackets):
  -n, --num-processes N   processes [NUM_PROCESSES]; default: one per GPU, or 2 on a machine without GPU
      --num-gpus N        GPUs to assume instead of asking nvidia-smi [NUM_GPUS]
      --program PATH      script to launch [PROGRAM] (default: pdiff/train.py)
  -m, --module NAME       launch a module instead, e.g. pdiff.collect [MODULE]
      --mixed-precision P no | bf16 | fp16 [MIXED_PRECISION] (default: bf16 on GPU, no on CPU)
      --port PORT         rendezvous port [MAIN_PROCESS_PORT] (default: accelerate's, 29500 or a free one)
      --cpu               use CPU processes even where GPUs exist [FORCE_CPU=1]
      --dry-run           print the resolved command instead of running it [DRY_RUN=1]
  -h, --help              this text
Executables: ACCELERATE (default: accelerate).
USAGE
}

PROGRAM="${PROGRAM:-$REPO_ROOT/pdiff/train.py}"
MODULE="${MODULE:-}"
NUM_PROCESSES="${NUM_PROCESSES:-}"
MIXED_PRECISION="${MIXED_PRECISION:-}"
MAIN_PROCESS_PORT="${MAIN_PROCESS_PORT:-}"
FORCE_CPU="${FORCE_CPU:-0}"
overrides=()
while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        -n | --num-processes) NUM_PROCESSES="${2:?$1 needs a value}"; shift ;;
        --num-gpus) NUM_GPUS="${2:?$1 needs a value}"; shift ;;
        --program) PROGRAM="${2:?$1 needs a value}"; shift ;;
        -m | --module) MODULE="${2:?$1 needs a value}"; shift ;;
        --mixed-precision) MIXED_PRECISION="${2:?$1 needs a value}"; shift ;;
        --port) MAIN_PROCESS_PORT="${2:?$1 needs a value}"; shift ;;
        --cpu) FORCE_CPU=1 ;;
        --) shift; overrides+=("$@"); break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) overrides+=("$1") ;;
    esac
    shift
done

gpus="$(count_gpus)"
[[ "$FORCE_CPU" == 1 ]] && gpus=0
is_uint "$gpus" || die "NUM_GPUS=$gpus is not a number"
prefix=()
if ((gpus > 0)); then
    procs="${NUM_PROCESSES:-$gpus}"
    precision="${MIXED_PRECISION:-bf16}"
else
    procs="${NUM_PROCESSES:-2}"
    precision="${MIXED_PRECISION:-no}"
    prefix=(env ACCELERATE_USE_CPU=1)
    log "no GPU: $procs CPU process(es) over gloo"
fi
is_uint "$procs" && ((procs > 0)) || die "--num-processes must be a positive number, got $procs"

cmd=("${prefix[@]}" "$ACCELERATE" launch --num_machines 1 --num_processes "$procs" --mixed_precision "$precision" --dynamo_backend no)
if ((procs > 1)); then
    cmd+=(--multi_gpu)
elif ((gpus == 0)); then
    cmd+=(--cpu)
fi
[[ -n "$MAIN_PROCESS_PORT" ]] && cmd+=(--main_process_port "$MAIN_PROCESS_PORT")
if [[ -n "$MODULE" ]]; then
    cmd+=(-m "$MODULE")
else
    cmd+=("$PROGRAM")
fi
run "${cmd[@]}" "${overrides[@]}"
