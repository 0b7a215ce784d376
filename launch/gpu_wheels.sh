#!/usr/bin/env bash
# Prepare what the GPU check needs on a machine that cannot reach a package registry.
#
#   bash launch/gpu_wheels.sh            # run HERE, where pip works; fills .device/ (ignored by git)
#
# .device/wheels/   the Python packages the GPU image lacks (diffusers, datasets, hydra-core and their
#                   missing needs), as wheels for CPython 3.12 on manylinux x86-64, without dependencies
# .device/fashion-mnist/   Fashion-MNIST's four .gz files (about 30 MB), from Debian's dataset-fashion-mnist
#
# Then the device call carries .device and runs `bash launch/gpu_check.sh --out $OUT`. wandb stays out:
# the check trains with train.report_to=none.
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
    cat <<USAGE
Usage: launch/gpu_wheels.sh [options]

Fills .device/wheels and .device/fashion-mnist for launch/gpu_check.sh on a machine without a registry.
Options:
      --dry-run     print the commands instead of running them [DRY_RUN=1]
  -h, --help        this text
Executables: PIP (default: python3 -m pip).
USAGE
}
while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done

DEST="$REPO_ROOT/.device"
PIP="${PIP:-python3 -m pip}"
# The versions pdiff is tested with here; the GPU image already has torch, accelerate, huggingface_hub,
# safetensors, pyarrow, pandas, fsspec, xxhash, requests, tqdm, pyyaml, pillow, regex, zipp.
PACKAGES=(diffusers==0.42.1 datasets==5.2.0 hydra-core==1.3.8 omegaconf==2.3.1 dill==0.4.1 multiprocess==0.70.19 importlib_metadata==8.7.0)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

run mkdir -p "$DEST/wheels" "$DEST/fashion-mnist"
run $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d "$DEST/wheels" "${PACKAGES[@]}"
# antlr4-python3-runtime (hydra's parser) is published as a source archive only; it is pure Python,
# so a wheel built here runs there.
run $PIP wheel -q --no-deps -w "$DEST/wheels" antlr4-python3-runtime==4.9.3

if [[ -d /usr/share/datasets/fashion-mnist ]]; then
    run cp /usr/share/datasets/fashion-mnist/*.gz "$DEST/fashion-mnist/"
else
    log "no /usr/share/datasets/fashion-mnist: apt-get install dataset-fashion-mnist, or the check will skip Fashion-MNIST"
fi
[[ "$DRY_RUN" == 1 ]] || du -sh "$DEST" >&2
