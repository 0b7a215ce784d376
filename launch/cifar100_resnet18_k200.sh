#!/usr/bin/env bash
# The paper's baseline (p-diff, arXiv 2402.13144, Table 5): CIFAR-100, ResNet-18, the last two BN layers
# (2,048 numbers), K=200 checkpoints; then the generator with the paper's recipe (configs/train/paper.yaml),
# which ends by generating networks and evaluating them against the originals and the baselines.
#
#   launch/cifar100_resnet18_k200.sh                                    # on this machine's GPUs
#   OUTPUT_DIR=/data/pdiff/c100 DATA_ROOT=/data/cifar launch/cifar100_resnet18_k200.sh train.report_to=wandb
#   launch/cifar100_resnet18_k200.sh --dry-run
#
# Step 1 (collect) runs in one process: the paper collects a single trajectory. Step 2 (train) runs on
# every GPU through launch/single_node.sh. Extra key=value overrides go to both steps (both compose the
# same config). An existing parameter dataset in OUTPUT_DIR/params is reused, so a rerun goes on with
# step 2; add `train.resume_from_checkpoint=latest` to continue an interrupted training run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<USAGE
Usage: launch/cifar100_resnet18_k200.sh [options] [--] [key=value overrides...]

Options (environment variable in brackets):
      --output-dir DIR    where the dataset, generator and report go [OUTPUT_DIR]
                          (default: outputs/cifar100_resnet18_k200)
      --data-root DIR     CIFAR-100 folder (torchvision layout; downloaded there when missing) [DATA_ROOT]
      --k K               checkpoints to collect [K] (default: 200)
  -n, --num-processes N   training processes [NUM_PROCESSES] (default: one per GPU)
      --skip-collect      train on the existing OUTPUT_DIR/params [SKIP_COLLECT=1]
      --dry-run           print the resolved commands instead of running them [DRY_RUN=1]
  -h, --help              this text
Executables: PDIFF, ACCELERATE (default: pdiff, accelerate). Training: see launch/single_node.sh --help.
USAGE
}

OUTPUT_DIR="${OUTPUT_DIR:-outputs/cifar100_resnet18_k200}"
DATA_ROOT="${DATA_ROOT:-}"
K="${K:-200}"
SKIP_COLLECT="${SKIP_COLLECT:-0}"
overrides=()
while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        --output-dir) OUTPUT_DIR="${2:?$1 needs a value}"; shift ;;
        --data-root) DATA_ROOT="${2:?$1 needs a value}"; shift ;;
        --k) K="${2:?$1 needs a value}"; shift ;;
        -n | --num-processes) export NUM_PROCESSES="${2:?$1 needs a value}"; shift ;;
        --skip-collect) SKIP_COLLECT=1 ;;
        --) shift; overrides+=("$@"); break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) overrides+=("$1") ;;
    esac
    shift
done
is_uint "$K" && ((K > 0)) || die "--k must be a positive number, got $K"

common=(task=cifar100_resnet18 "output_dir=$OUTPUT_DIR")
[[ -n "$DATA_ROOT" ]] && common+=("task.data.root=$DATA_ROOT")

log "step 1/2: collect $K checkpoints of layer4.1.bn1 + layer4.1.bn2"
if [[ "$SKIP_COLLECT" == 1 ]]; then
    log "skipped (--skip-collect): training on $OUTPUT_DIR/params"
elif [[ "$DRY_RUN" != 1 && -f "$OUTPUT_DIR/params/pdiff_dataset.json" ]]; then
    log "$OUTPUT_DIR/params exists: reusing it (delete it to collect again)"
else
    run "$PDIFF" collect "${common[@]}" "task.param.k=$K" "${overrides[@]}"
fi

log "step 2/2: train the generator (generator=paper train=paper) and evaluate what it generates"
DRY_RUN="$DRY_RUN" "$(dirname "${BASH_SOURCE[0]}")/single_node.sh" -- "${common[@]}" generator=paper train=paper "task.param.k=$K" "${overrides[@]}"
