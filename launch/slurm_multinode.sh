#!/usr/bin/env bash
#SBATCH --job-name=pdiff
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; accelerate starts one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#
# Multi-node training: `srun` starts `accelerate launch` once on every node of the allocation; the
# nodes meet through torch's c10d rendezvous store on the first node.
#
#   sbatch launch/slurm_multinode.sh task=cifar100_resnet18 train=paper output_dir=/shared/pdiff/c100
#   sbatch --nodes=4 --gpus-per-node=4 launch/slurm_multinode.sh ...
#   SLURM_NNODES=2 MAIN_PROCESS_IP=gpu01 NUM_GPUS=8 launch/slurm_multinode.sh --dry-run task=digits
#
# Submit from the repository root, on a filesystem every node sees (outputs are written by the global
# main process, which c10d may place on any node). Per node it runs, with N = node index 0..nodes-1:
#
#   accelerate launch --config_file accelerate_config.yaml --multi_gpu --num_machines NODES \
#       --machine_rank N --num_processes NODES*GPUS --main_process_ip FIRST_NODE \
#       --main_process_port PORT --rdzv_backend c10d ... pdiff/train.py overrides...
#
# `--node` runs only that per-node step (what srun calls; SLURM_NODEID gives the node index), which is
# also how to try multi-node on one machine: two shells, SLURM_NODEID=0 and 1, MAIN_PROCESS_IP=127.0.0.1.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ ! -f "$here/common.sh" && -n "${SLURM_SUBMIT_DIR:-}" ]]; then
    here="$SLURM_SUBMIT_DIR/launch"   # sbatch runs a spooled copy of this file
fi
source "$here/common.sh"
SELF="$here/slurm_multinode.sh"

usage() {
    cat <<USAGE
Usage: sbatch launch/slurm_multinode.sh [options] [--] [key=value overrides...]
       launch/slurm_multinode.sh --node [options] [--] [overrides...]   (one node's step)

Options (environment variable in brackets):
      --nodes N           nodes [NUM_MACHINES] (default: SLURM_NNODES)
      --gpus-per-node N   GPUs per node [GPUS_PER_NODE] (default: SLURM_GPUS_ON_NODE, else nvidia-smi,
                          else 0: CPU processes over gloo, for testing)
      --procs-per-node N  processes per node [PROCS_PER_NODE] (default: GPUs per node, or 1 on CPU)
      --main-ip HOST      rendezvous host [MAIN_PROCESS_IP] (default: first node of SLURM_JOB_NODELIST)
      --port PORT         rendezvous port [MAIN_PROCESS_PORT] (default: 20000 + SLURM_JOB_ID % 20000)
      --program PATH      script to launch [PROGRAM] (default: pdiff/train.py)
  -m, --module NAME       launch a module instead, e.g. pdiff.collect [MODULE]
      --mixed-precision P [MIXED_PRECISION] (default: bf16 on GPU, no on CPU)
      --config FILE       accelerate config [ACCELERATE_CONFIG] (default: accelerate_config.yaml)
      --node              run this node's launcher only; node index from SLURM_NODEID [MACHINE_RANK]
      --dry-run           print the srun command and every node's resolved command [DRY_RUN=1]
  -h, --help              this text
Executables: ACCELERATE, SRUN (default: accelerate, srun).
USAGE
}

SRUN="${SRUN:-srun}"
NUM_MACHINES="${NUM_MACHINES:-${SLURM_NNODES:-}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
PROCS_PER_NODE="${PROCS_PER_NODE:-}"
MAIN_PROCESS_IP="${MAIN_PROCESS_IP:-}"
MAIN_PROCESS_PORT="${MAIN_PROCESS_PORT:-}"
PROGRAM="${PROGRAM:-$REPO_ROOT/pdiff/train.py}"
MODULE="${MODULE:-}"
MIXED_PRECISION="${MIXED_PRECISION:-}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-$REPO_ROOT/accelerate_config.yaml}"
node_mode=0
overrides=()
while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        --node) node_mode=1 ;;
        --nodes) NUM_MACHINES="${2:?$1 needs a value}"; shift ;;
        --gpus-per-node) GPUS_PER_NODE="${2:?$1 needs a value}"; shift ;;
        --procs-per-node) PROCS_PER_NODE="${2:?$1 needs a value}"; shift ;;
        --main-ip) MAIN_PROCESS_IP="${2:?$1 needs a value}"; shift ;;
        --port) MAIN_PROCESS_PORT="${2:?$1 needs a value}"; shift ;;
        --program) PROGRAM="${2:?$1 needs a value}"; shift ;;
        -m | --module) MODULE="${2:?$1 needs a value}"; shift ;;
        --mixed-precision) MIXED_PRECISION="${2:?$1 needs a value}"; shift ;;
        --config) ACCELERATE_CONFIG="${2:?$1 needs a value}"; shift ;;
        --) shift; overrides+=("$@"); break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) overrides+=("$1") ;;
    esac
    shift
done

# -- settings shared by every node (resolved once, on the first node, and exported to srun's tasks) --
[[ -n "$NUM_MACHINES" ]] || die "no node count: submit with sbatch (SLURM_NNODES), or pass --nodes N"
is_uint "$NUM_MACHINES" && ((NUM_MACHINES > 0)) || die "--nodes must be a positive number, got $NUM_MACHINES"
if [[ -z "$MAIN_PROCESS_IP" ]]; then
    [[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "no rendezvous host: run inside an allocation (SLURM_JOB_NODELIST) or pass --main-ip HOST"
    command -v scontrol >/dev/null 2>&1 || die "scontrol not found to expand SLURM_JOB_NODELIST: pass --main-ip HOST"
    MAIN_PROCESS_IP="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
fi
# A per-job port, so two jobs whose first node is the same machine do not collide.
MAIN_PROCESS_PORT="${MAIN_PROCESS_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
GPUS_PER_NODE="${GPUS_PER_NODE:-$(count_gpus)}"
GPUS_PER_NODE="${GPUS_PER_NODE%%(*}"   # SLURM may write "8(x2)"
is_uint "$GPUS_PER_NODE" || die "GPUs per node must be a number, got $GPUS_PER_NODE"
if ((GPUS_PER_NODE > 0)); then
    PROCS_PER_NODE="${PROCS_PER_NODE:-$GPUS_PER_NODE}"
    MIXED_PRECISION="${MIXED_PRECISION:-bf16}"
else
    PROCS_PER_NODE="${PROCS_PER_NODE:-1}"
    MIXED_PRECISION="${MIXED_PRECISION:-no}"
fi
is_uint "$PROCS_PER_NODE" && ((PROCS_PER_NODE > 0)) || die "processes per node must be a positive number, got $PROCS_PER_NODE"

# node_command RANK: fills `cmd` with the launcher for node RANK.
node_command() {
    local rank="$1"
    cmd=()
    ((GPUS_PER_NODE > 0)) || cmd+=(env ACCELERATE_USE_CPU=1)   # CPU processes over gloo
    # No --same_network: with it accelerate hands torchrun only a master address, which the c10d
    # rendezvous ignores (every node would then look for the store on its own localhost).
    cmd+=("$ACCELERATE" launch --config_file "$ACCELERATE_CONFIG" --multi_gpu
        --num_machines "$NUM_MACHINES" --machine_rank "$rank"
        --num_processes "$((NUM_MACHINES * PROCS_PER_NODE))"
        --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT"
        --rdzv_backend c10d --mixed_precision "$MIXED_PRECISION")
    if [[ -n "$MODULE" ]]; then
        cmd+=(-m "$MODULE")
    else
        cmd+=("$PROGRAM")
    fi
    cmd+=("${overrides[@]}")
}

if ((node_mode)); then
    rank="${MACHINE_RANK:-${SLURM_NODEID:-}}"
    [[ -n "$rank" ]] || die "--node needs the node index: SLURM_NODEID (set by srun) or MACHINE_RANK"
    is_uint "$rank" && ((rank < NUM_MACHINES)) || die "node index $rank is not in 0..$((NUM_MACHINES - 1))"
    node_command "$rank"
    run "${cmd[@]}"
    exit
fi

export NUM_MACHINES GPUS_PER_NODE PROCS_PER_NODE MAIN_PROCESS_IP MAIN_PROCESS_PORT PROGRAM MODULE MIXED_PRECISION ACCELERATE_CONFIG ACCELERATE
log "$NUM_MACHINES node(s) x $PROCS_PER_NODE process(es), rendezvous at $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT (c10d)"
run "$SRUN" --nodes="$NUM_MACHINES" --ntasks="$NUM_MACHINES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash "$SELF" --node -- "${overrides[@]}"
if [[ "$DRY_RUN" == 1 ]]; then
    for ((r = 0; r < NUM_MACHINES; r++)); do
        log "node $r runs:"
        node_command "$r"
        run "${cmd[@]}"
    done
fi
