"""The launchers in launch/ and accelerate_config.yaml: syntax, --help, dry runs, and real CPU runs.

Every launcher prints each command it runs as a shell-quoted line starting with "+ "; the dry-run tests
parse those lines back into argv lists. Multi-node runs for real on this machine: two "machines" (two
`launch/slurm_multinode.sh --node` invocations, SLURM_NODEID 0 and 1, one CPU process each) meet through
the c10d rendezvous on 127.0.0.1.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from ports import free_port, port_in_use

LAUNCH = REPO_ROOT / "launch"
LAUNCHERS = sorted(p.name for p in LAUNCH.glob("*.sh") if p.name != "common.sh")
TRAIN = str(REPO_ROOT / "pdiff" / "train.py")
# Settings the launchers read from the environment: the tests start from none of them.
SETTINGS = {"DRY_RUN", "NUM_GPUS", "NUM_PROCESSES", "PROGRAM", "MODULE", "MIXED_PRECISION", "MAIN_PROCESS_PORT", "MAIN_PROCESS_IP",
            "FORCE_CPU", "NUM_MACHINES", "GPUS_PER_NODE", "PROCS_PER_NODE", "MACHINE_RANK", "ACCELERATE_CONFIG", "OUTPUT_DIR",
            "DATA_ROOT", "K", "SKIP_COLLECT", "AGENTS", "COUNT", "SWEEP_ID", "WANDB_PROJECT", "WANDB_ENTITY", "ACCELERATE",
            "PDIFF", "WANDB", "SRUN", "PDIFF_ROOT", "CUDA_VISIBLE_DEVICES"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith("SLURM_")}
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return {**env, **extra}


def launch(script: str, *args: str, cwd: Path | None = None, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=cwd or REPO_ROOT, env=_env(**env), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def commands(proc: subprocess.CompletedProcess) -> list[list[str]]:
    """The commands a launcher printed ("+ " lines), as argv lists."""
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


def flag(argv: list[str], name: str) -> str:
    """The value after `name` in argv (exactly once)."""
    assert argv.count(name) == 1, f"{name} appears {argv.count(name)} times in {argv}"
    return argv[argv.index(name) + 1]


# -- every launcher ------------------------------------------------------------------------------


@pytest.mark.parametrize("script", LAUNCHERS + ["common.sh"])
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", LAUNCHERS)
def test_help_and_unknown_options(script):
    proc = launch(script, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("Usage:") and "--dry-run" in proc.stdout
    proc = launch(script, "--no-such-option", "--dry-run")
    assert proc.returncode == 2 and "unknown option --no-such-option" in proc.stderr
    assert os.access(LAUNCH / script, os.X_OK), f"{script} is not executable"


def test_accelerate_config_template():
    """accelerate's own loader reads the template; rendezvous settings are the c10d ones."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(REPO_ROOT / "accelerate_config.yaml"))
    assert cfg.distributed_type.value == "MULTI_GPU" and cfg.mixed_precision == "bf16"
    assert cfg.rdzv_backend == "c10d" and cfg.same_network is False  # see the file: same_network breaks c10d
    assert (cfg.num_machines, cfg.machine_rank, cfg.main_process_port) == (1, 0, 29500)


# -- single node ----------------------------------------------------------------------------------


def test_single_node_dry_run():
    (cpu,) = commands(launch("single_node.sh", "--dry-run", "task=digits", "train.ae_steps=5", NUM_GPUS="0"))
    assert cpu == ["env", "ACCELERATE_USE_CPU=1", "accelerate", "launch", "--num_machines", "1", "--num_processes", "2",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", TRAIN, "task=digits", "train.ae_steps=5"]
    (gpu,) = commands(launch("single_node.sh", "task=digits", DRY_RUN="1", NUM_GPUS="4", MAIN_PROCESS_PORT="29555"))
    assert gpu[:2] == ["accelerate", "launch"] and "--multi_gpu" in gpu and "ACCELERATE_USE_CPU=1" not in gpu
    assert (flag(gpu, "--num_processes"), flag(gpu, "--mixed_precision"), flag(gpu, "--main_process_port")) == ("4", "bf16", "29555")
    (one,) = commands(launch("single_node.sh", "--dry-run", "-n", "1", "-m", "pdiff.collect", "--", "task=digits", NUM_GPUS="0"))
    assert "--cpu" in one and "--multi_gpu" not in one and one[-3:] == ["-m", "pdiff.collect", "task=digits"]
    (forced,) = commands(launch("single_node.sh", "--dry-run", "--cpu", "--num-gpus", "8"))
    assert forced[:2] == ["env", "ACCELERATE_USE_CPU=1"] and flag(forced, "--num_processes") == "2"


@pytest.mark.slow
def test_single_node_runs_two_cpu_processes(tmp_path):
    """The CPU fallback starts two real ranks: each collects its own share of the checkpoints."""
    from pdiff.data import ParameterDataset

    proc = launch("single_node.sh", "-m", "pdiff.collect", f"output_dir={tmp_path}", "task.param.k=6", "task.base.epochs=2",
                  NUM_GPUS="0", MAIN_PROCESS_PORT=str(free_port()), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds = ParameterDataset.from_pretrained(tmp_path / "params")
    assert ds.info["num_processes"] == 2 and len(ds) == 6 and sorted(set(ds.column("seed"))) == [1, 2]


# -- SLURM multi-node -------------------------------------------------------------------------------


def test_slurm_dry_run_resolves_every_node():
    proc = launch("slurm_multinode.sh", "--dry-run", "task=digits", "train=default",
                  SLURM_NNODES="2", MAIN_PROCESS_IP="gpu01", NUM_GPUS="8", SLURM_JOB_ID="1234")
    srun, *nodes = commands(proc)
    assert srun[:6] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash"]
    assert srun[6:] == [str(LAUNCH / "slurm_multinode.sh"), "--node", "--", "task=digits", "train=default"]
    assert len(nodes) == 2
    for rank, argv in enumerate(nodes):
        assert argv[:2] == ["accelerate", "launch"] and "--multi_gpu" in argv and "--same_network" not in argv
        assert flag(argv, "--num_machines") == "2" and flag(argv, "--machine_rank") == str(rank)
        assert flag(argv, "--num_processes") == "16"  # 2 nodes x 8 GPUs
        assert (flag(argv, "--main_process_ip"), flag(argv, "--main_process_port")) == ("gpu01", "21234")
        assert flag(argv, "--rdzv_backend") == "c10d" and flag(argv, "--mixed_precision") == "bf16"
        assert Path(flag(argv, "--config_file")) == REPO_ROOT / "accelerate_config.yaml"
        assert argv[-3:] == [TRAIN, "task=digits", "train=default"]


def test_slurm_finds_the_first_node_and_cpu_fallback(tmp_path):
    """The rendezvous host is the first host `scontrol` expands SLURM_JOB_NODELIST to; no GPU -> gloo."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames node[07-09]" ] && printf "node07\\nnode08\\nnode09\\n"\n')
    (fake / "scontrol").chmod(0o755)
    proc = launch("slurm_multinode.sh", "--dry-run", "-m", "pdiff.collect", SLURM_NNODES="3", SLURM_JOB_NODELIST="node[07-09]",
                  GPUS_PER_NODE="0", PATH=f"{fake}{os.pathsep}{_env()['PATH']}")
    _, *nodes = commands(proc)
    assert [flag(a, "--machine_rank") for a in nodes] == ["0", "1", "2"]
    for argv in nodes:
        assert argv[:2] == ["env", "ACCELERATE_USE_CPU=1"] and flag(argv, "--main_process_ip") == "node07"
        assert flag(argv, "--num_processes") == "3" and flag(argv, "--mixed_precision") == "no"
        assert flag(argv, "--main_process_port") == "20000" and argv[-2:] == ["-m", "pdiff.collect"]


def test_slurm_refuses_incomplete_settings():
    proc = launch("slurm_multinode.sh", "--dry-run")
    assert proc.returncode == 2 and "no node count" in proc.stderr
    proc = launch("slurm_multinode.sh", "--dry-run", SLURM_NNODES="2")
    assert proc.returncode == 2 and "no rendezvous host" in proc.stderr
    proc = launch("slurm_multinode.sh", "--node", "--dry-run", SLURM_NNODES="2", MAIN_PROCESS_IP="h", NUM_GPUS="1", SLURM_NODEID="2")
    assert proc.returncode == 2 and "not in 0..1" in proc.stderr


def run_two_machines(tmp_path: Path, *args: str, timeout: float = 600, **extra_env: str) -> None:
    """`slurm_multinode.sh --node` as machine 0, then as machine 1, one CPU process each; both must succeed."""
    port = free_port()
    env = _env(SLURM_NNODES="2", MAIN_PROCESS_IP="127.0.0.1", MAIN_PROCESS_PORT=str(port), GPUS_PER_NODE="0", **extra_env)
    procs, logs = [], []
    for rank in (0, 1):
        log = open(tmp_path / f"machine{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(["bash", str(LAUNCH / "slurm_multinode.sh"), "--node", *args], cwd=tmp_path,
                                      env={**env, "SLURM_NODEID": str(rank)}, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
        if rank == 0:
            # Machine 0 hosts the c10d store: start machine 1 once it listens (on one host, a machine 1 that
            # bound the port first would trip accelerate's port check on machine 0).
            deadline = time.monotonic() + 120
            while not port_in_use(port) and procs[0].poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    for rank, code in enumerate(codes):
        assert code == 0, f"machine {rank} exited {code}:\n" + (tmp_path / f"machine{rank}.log").read_text()[-4000:]


@pytest.mark.slow
def test_two_machines_collect_as_one_world(tmp_path):
    """Two `accelerate launch --num_machines 2` invocations form one 2-process world (gloo, c10d)."""
    from pdiff.data import ParameterDataset

    out = tmp_path / "run"
    run_two_machines(tmp_path, "-m", "pdiff.collect", f"output_dir={out}", "task.param.k=6", "task.base.epochs=2")
    ds = ParameterDataset.from_pretrained(out / "params")
    # One dataset, gathered from both machines: each rank collected its own trajectory (seed 1 + rank).
    assert ds.info["num_processes"] == 2 and len(ds) == 6 and sorted(set(ds.column("seed"))) == [1, 2]


# Runs pdiff/train.py unchanged; at `Accelerator.end_training` (every rank) it writes a hash of every model
# the run prepared, as prepared and as trained, so the test can compare what each machine ends with.
HASHING_TRAIN = """\
import hashlib, os, sys
from pathlib import Path

import torch
from accelerate import Accelerator

prepared = []
_prepare, _end_training = Accelerator.prepare, Accelerator.end_training


def weights_hash(accelerator):
    digest = hashlib.sha256()
    for model in prepared:
        for name, tensor in sorted(accelerator.unwrap_model(model).state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def prepare(self, *args, **kwargs):
    global initial
    out = _prepare(self, *args, **kwargs)
    prepared.extend(o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, torch.nn.Module))
    initial = weights_hash(self)
    return out


def end_training(self):
    line = f"{self.num_processes} {len(prepared)} {initial} {weights_hash(self)}"
    Path(os.environ["HASH_DIR"], f"rank{self.process_index}.txt").write_text(line)
    _end_training(self)


Accelerator.prepare, Accelerator.end_training = prepare, end_training
from pdiff.train import main

main(sys.argv[1:])
"""


@pytest.mark.slow
def test_two_machines_train_to_identical_weights(tmp_path, digits_params):
    """A short pdiff/train.py run over two "machines" ends with the same weights on both."""
    out = tmp_path / "run"
    shutil.copytree(digits_params, out / "params")
    (tmp_path / "hashing_train.py").write_text(HASHING_TRAIN)
    hashes = tmp_path / "hashes"
    hashes.mkdir()
    run_two_machines(tmp_path, "--program", str(tmp_path / "hashing_train.py"), f"output_dir={out}", "train.ae_steps=6",
                     "train.diffusion_steps=6", "train.eval_every=0", "train.num_final_models=4", "train.eval_num_models=4",
                     "train.batch_size=8", "train.checkpointing_steps=0", "generator.autoencoder.channels=[16,32]",
                     "generator.unet.block_out_channels=[8,16]", "generator.num_inference_steps=4", HASH_DIR=str(hashes))
    rank0, rank1 = ((hashes / f"rank{r}.txt").read_text().split() for r in (0, 1))
    assert rank0[:2] == ["2", "2"], "expected a world of 2 processes, each with the autoencoder and the UNet prepared"
    assert rank0[2] != rank0[3], "training did not change the weights"
    assert rank0 == rank1
    assert (out / "generator" / "report.json").is_file()  # saved once, by the global main process


# -- the paper baseline ---------------------------------------------------------------------------


def test_cifar100_baseline_dry_run(tmp_path):
    collect, train = commands(launch("cifar100_resnet18_k200.sh", "--dry-run", "train.report_to=wandb", NUM_GPUS="2", OUTPUT_DIR="/data/c100", DATA_ROOT="/data/cifar"))
    common = ["task=cifar100_resnet18", "output_dir=/data/c100", "task.data.root=/data/cifar"]
    assert collect == ["pdiff", "collect", *common, "task.param.k=200", "train.report_to=wandb"]
    assert train[:2] == ["accelerate", "launch"] and flag(train, "--num_processes") == "2" and "--multi_gpu" in train
    assert train[train.index(TRAIN) + 1 :] == [*common, "generator=paper", "train=paper", "task.param.k=200", "train.report_to=wandb"]
    # An existing dataset is reused; --skip-collect goes straight to training.
    (tmp_path / "c100" / "params").mkdir(parents=True)
    (tmp_path / "c100" / "params" / "pdiff_dataset.json").write_text("{}")
    proc = launch("cifar100_resnet18_k200.sh", "--skip-collect", "--k", "50", "--output-dir", str(tmp_path / "c100"), DRY_RUN="1", NUM_GPUS="1")
    (only,) = commands(proc)
    assert "task.param.k=50" in only and "--multi_gpu" not in only and "skipped" in proc.stderr


def test_cifar100_baseline_overrides_compose():
    """The two steps' overrides name real config keys and groups (train=paper included)."""
    from pdiff.config import load_config

    collect, train = commands(launch("cifar100_resnet18_k200.sh", "--dry-run", NUM_GPUS="1"))
    assert load_config(collect[2:]).task.param.k == 200
    cfg = load_config(train[train.index(TRAIN) + 1 :])
    assert cfg.task.name == "cifar100_resnet18" and cfg.generator_dir == "outputs/cifar100_resnet18_k200/generator"
    assert cfg.train.ae_lr == 2e-5 and cfg.generator.unet.block_out_channels == [32, 64, 128, 256]


# -- sweeps ---------------------------------------------------------------------------------------


def test_sweep_dry_run():
    create, a0, a1 = commands(launch("sweep.sh", "configs/sweeps/noise_grid.yaml", "--dry-run", "--agents", "2", "--count", "3", "--project", "p", NUM_GPUS="2"))
    assert create == ["wandb", "sweep", "--project", "p", "configs/sweeps/noise_grid.yaml"]
    assert a0 == ["env", "CUDA_VISIBLE_DEVICES=0", "wandb", "agent", "--count", "3", "ENTITY/PROJECT/SWEEP_ID"]
    assert a1[:2] == ["env", "CUDA_VISIBLE_DEVICES=1"]
    (join,) = commands(launch("sweep.sh", "--dry-run", SWEEP_ID="me/pdiff/abc", NUM_GPUS="0"))
    assert join == ["wandb", "agent", "me/pdiff/abc"]
    proc = launch("sweep.sh", "--dry-run", "configs/sweeps/noise_grid.yaml", "train.ae_steps=3")
    assert proc.returncode == 2 and "--local only" in proc.stderr


def test_sweep_creates_then_starts_agents(tmp_path):
    """Without --dry-run: the sweep id is read from `wandb sweep`'s output and every agent joins it."""
    fake, calls = tmp_path / "wandb", tmp_path / "calls"
    fake.write_text(f"""#!/bin/sh
echo "$*" >> {calls}
if [ "$1" = sweep ]; then
  printf 'wandb: Created sweep with ID: \\033[33mabc123\\033[0m\\nwandb: Run sweep agent with: \\033[33mwandb agent me/pdiff/abc123\\033[0m\\n' >&2
fi
""")
    fake.chmod(0o755)
    proc = launch("sweep.sh", "configs/sweeps/noise_grid.yaml", "--agents", "2", "--count", "1", WANDB=str(fake), NUM_GPUS="0")
    assert proc.returncode == 0, proc.stderr
    assert "created sweep me/pdiff/abc123" in proc.stderr
    assert calls.read_text().splitlines() == ["sweep configs/sweeps/noise_grid.yaml", "agent --count 1 me/pdiff/abc123", "agent --count 1 me/pdiff/abc123"]


def test_sweep_local_goes_through_pdiff_sweep():
    pytest.importorskip("sweeps")
    proc = launch("sweep.sh", "--local", "--dry-run", "configs/sweeps/noise_grid.yaml", "--count", "2", "train.ae_steps=3", timeout=120)
    (cmd,) = commands(proc)
    assert cmd == ["pdiff", "sweep", "configs/sweeps/noise_grid.yaml", "--local", "--count", "2", "--dry-run", "train.ae_steps=3"]
    trials = [line for line in proc.stdout.splitlines() if line.startswith("[noise_grid")]
    assert len(trials) == 2 and all("accelerate launch -m pdiff.train" in t and "train.ae_steps=3" in t for t in trials)


def test_common_helpers_quote_dry_run_and_fail_clearly(tmp_path):
    """launch/common.sh, sourced as the launchers do: commands print shell-quoted and do not run in a dry
    run, the GPU count honours NUM_GPUS, and `die` exits 2 naming the launcher."""
    marker = tmp_path / "ran"
    script = f"""
source {LAUNCH / 'common.sh'}
DRY_RUN=1 run touch "{marker}" "a b"
DRY_RUN=0 run true
NUM_GPUS=3 count_gpus
is_uint 12 && echo uint-yes
is_uint -1 || echo uint-no
die "bad thing"
echo never
"""
    proc = subprocess.run(["bash", "-c", script, "mylauncher"], capture_output=True, text=True, timeout=30)
    assert proc.stdout.splitlines() == [f"+ touch {marker} a\\ b", "+ true", "3", "uint-yes", "uint-no"]
    assert not marker.exists()  # the dry run printed the command only
    assert proc.returncode == 2 and proc.stderr.strip().endswith("error: bad thing")


# -- the GPU check --------------------------------------------------------------------------------


def test_gpu_check_smoke_runs_every_step_on_cpu(tmp_path):
    """`launch/gpu_check.sh --smoke`: the device check's own steps, tiny and on CPU, so it is known to run
    before a GPU machine is lent for it."""
    import json

    proc = launch("gpu_check.sh", "--smoke", "--out", str(tmp_path / "out"), timeout=600, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: 0 step(s) failed" in proc.stderr
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["bench_fashion_mnist_bf16.json", "bench_fashion_mnist_no.json", "bench_resnet18_paper.json", "check.log", "gpu_tests.xml"]
    for name in names[:3]:
        result = json.loads((tmp_path / "out" / name).read_text())
        assert {"collect", "autoencoder", "diffusion", "sampling_ddim", "evaluation"} <= set(result["phases"])
    assert json.loads((tmp_path / "out" / "bench_fashion_mnist_bf16.json").read_text())["phases"]["train_total"]["mixed_precision"] == "bf16"
    collected = [line for line in proc.stdout.splitlines() if line.startswith("tests/test_gpu.py::") or "test_gpu.py::" in line]
    assert len(collected) == 6  # the CUDA tests import and are selected by -m gpu (they run only on a GPU)
