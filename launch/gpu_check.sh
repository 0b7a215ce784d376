#!/usr/bin/env bash
# The GPU check: pdiff's CUDA tests and benchmarks in one command, every figure as JSON.
#
#   bash launch/gpu_check.sh --out DIR                  # on a GPU machine (about 8 minutes on one H100)
#   bash launch/gpu_check.sh --smoke --out DIR          # anywhere, in under a minute: the same steps, tiny and on CPU
#   bash launch/gpu_check.sh --only tests,fp16 --out DIR   # some of the steps (a rerun after a fix)
#
# What it runs, most telling first (a device machine is lent for minutes), writing DIR/<name>.json per
# benchmark, DIR/gpu_tests.xml and the whole log as DIR/check.log:
#   bf16, paper  pdiff bench --task fashion_mnist (D = 778) in bf16; then the paper-scale recipe
#                generator=paper train=paper on fake_cifar_resnet18 (D = 2,048, synthetic data) at
#                CIFAR-100's sizes (45k train + 5k val + 10k test images, batch 128, K = 200), so its collection and
#                training rates extrapolate to the real task
#   tests        pytest -m gpu: collect -> train -> sample -> evaluate on CUDA, fp16/bf16 steps,
#                bit-equal save/load, batched == one-by-one scoring, seeded sampling
#   fp16, no     pdiff bench --task fashion_mnist with train.mixed_precision = fp16 and no, 50 networks each
# Packages the GPU image lacks come from .device/wheels and Fashion-MNIST from .device/fashion-mnist
# (launch/gpu_wheels.sh prepares both here); pdiff itself runs from this working tree.
set -uo pipefail  # not -e: a failed step is counted and the next one still runs
source "$(dirname "$0")/common.sh"

usage() {
    cat <<USAGE
Usage: launch/gpu_check.sh --out DIR [options]

Options:
      --out DIR     where the JSON figures (and gpu_tests.xml) go; required
      --smoke       the same steps, tiny and on CPU, in under a minute (also: --cpu)
      --only LIST   only these steps, comma-separated: env, bf16, paper, tests, fp16, no (default: all)
      --step-timeout S   stop a step after S seconds and go on with the next [STEP_TIMEOUT] (default: none)
      --dry-run     print the commands instead of running them [DRY_RUN=1]
  -h, --help        this text
Executables: PYTHON (default: python3).
USAGE
}

STEPS="env,bf16,paper,tests,fp16,no"  # in the order they run
OUT="" SMOKE=0 ONLY="$STEPS" STEP_TIMEOUT="${STEP_TIMEOUT:-0}"
while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        --out) OUT="${2:?$1 needs a folder}"; shift ;;
        --smoke | --cpu) SMOKE=1 ;;
        --only) ONLY="${2:?$1 needs a comma-separated list of steps}"; shift ;;
        --step-timeout) STEP_TIMEOUT="${2:?$1 needs seconds}"; shift ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) die "unexpected argument $1 (see --help)" ;;
    esac
    shift
done
[[ -n "$OUT" ]] || die "--out DIR is required: where the JSON figures go"
is_uint "$STEP_TIMEOUT" || die "--step-timeout $STEP_TIMEOUT: give whole seconds (0: no limit)"
for name in ${ONLY//,/ }; do
    [[ ",$STEPS," == *",$name,"* ]] || die "--only: no step named $name (${STEPS//,/, })"
done
mkdir -p "$OUT"
exec 2> >(tee -a "$OUT/check.log" >&2)  # the whole log comes back even when the machine's call is cut short
PYTHON="${PYTHON:-python3}"

if [[ -d "$REPO_ROOT/.device/wheels" ]] && ! "$PYTHON" -c "import diffusers, datasets, hydra" 2>/dev/null; then
    run "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pdiff-site "$REPO_ROOT"/.device/wheels/*.whl || die "installing .device/wheels failed"
    export PYTHONPATH="/tmp/pdiff-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [[ -d "$REPO_ROOT/.device/fashion-mnist" ]]; then  # where torchvision looks for the files, unpacked
    export PDIFF_DATA_DIR="${PDIFF_DATA_DIR:-/tmp/pdiff-data}"
    mkdir -p "$PDIFF_DATA_DIR/FashionMNIST/raw"
    for f in "$REPO_ROOT"/.device/fashion-mnist/*.gz; do
        target="$PDIFF_DATA_DIR/FashionMNIST/raw/$(basename "${f%.gz}")"
        [[ -f "$target" ]] || gunzip -c "$f" > "$target.partial" && mv "$target.partial" "$target"
    done
fi
PDIFF_CMD=("$PYTHON" -m pdiff)
failures=0
# step NAME CMD...: run CMD (stdout to the log too) when NAME is selected, within STEP_TIMEOUT; count failures.
step() {
    local name=$1; shift
    [[ ",$ONLY," == *",$name,"* ]] || return 0
    local limit=()
    ((STEP_TIMEOUT > 0)) && limit=(timeout --kill-after=10 "$STEP_TIMEOUT")
    log "$name"
    local started=$SECONDS
    run "${limit[@]}" "$@" > >(tee -a "$OUT/check.log") || { log "FAILED: $name"; failures=$((failures + 1)); }
    log "$name took $((SECONDS - started)) s"
}

if [[ "$SMOKE" == 1 ]]; then
    DEVICE=cpu OTHER_PRECISIONS=(no) FASHION=(--task digits --num-models 8 --steps 4 task.param.k=16 task.base.epochs=1 train.ae_steps=8 train.diffusion_steps=8 train.eval_every=8
             train.eval_num_models=4 generator.scheduler.num_train_timesteps=20 generator.num_inference_steps=4)
    PAPER=(--task fake_cifar_resnet18 --num-models 4 --steps 4 generator=paper train=paper task.data.train_size=64 task.data.val_size=16 task.data.test_size=32
           task.base.epochs=1 task.base.batch_size=32 task.param.batch_size=16 task.param.k=8 train.batch_size=4 train.ae_steps=2 train.diffusion_steps=2
           train.eval_every=2 train.eval_num_models=2 generator.scheduler.num_train_timesteps=20 generator.num_inference_steps=4)
    TESTS=(-m gpu --co -q)  # collection only: the tests themselves need CUDA
    OTHER_PRECISION_ARGS=()
else
    DEVICE=cuda OTHER_PRECISIONS=(fp16 no) FASHION=(--task fashion_mnist train.ae_steps=500 train.diffusion_steps=1000)
    PAPER=(--task fake_cifar_resnet18 generator=paper train=paper task.data.train_size=50000 task.data.val_size=5000 task.data.test_size=10000
           task.base.batch_size=128 task.param.batch_size=128 task.param.k=200 task.param.warmup_steps=100 task.eval.batch_size=250)
    TESTS=(-m gpu -q -p no:cacheprovider)
    OTHER_PRECISION_ARGS=(--num-models 50)
    [[ "$DRY_RUN" == 1 ]] || "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || die "no CUDA device visible (use --smoke to check the script on CPU)"
fi

step env "$PYTHON" -c "import json, torch, diffusers, accelerate, datasets, pyarrow, fsspec, hydra, numpy; print(json.dumps({'pyarrow': pyarrow.__version__, 'fsspec': fsspec.__version__, 'datasets': datasets.__version__, 'numpy': numpy.__version__, 'torch': torch.__version__, 'cuda': torch.version.cuda, 'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', 'diffusers': diffusers.__version__, 'accelerate': accelerate.__version__}))"
fashion() { step "$1" "${PDIFF_CMD[@]}" bench --device "$DEVICE" --out "$OUT/bench_fashion_mnist_$1.json" "${FASHION[@]}" train.mixed_precision="$1" "${@:2}"; }
fashion bf16
step paper "${PDIFF_CMD[@]}" bench --device "$DEVICE" --out "$OUT/bench_resnet18_paper.json" "${PAPER[@]}"
step tests "$PYTHON" -m pytest "$REPO_ROOT/tests" "${TESTS[@]}" --junitxml "$OUT/gpu_tests.xml"
# The other precisions are for their step rates: 50 networks each (an H200 spent 16 s of a 118 s fp32 run on
# the report of 200 and its 1,400 reference networks), so the whole check fits about 8 minutes.
for precision in "${OTHER_PRECISIONS[@]}"; do
    fashion "$precision" "${OTHER_PRECISION_ARGS[@]}"
done
log "done: $failures step(s) failed; figures in $OUT"
exit $(( failures > 0 ))
