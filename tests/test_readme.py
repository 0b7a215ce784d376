"""The README's commands: every `pdiff` command parses and composes, the launchers' commands dry-run,
and the set-up command and the Quickstart run for real, in order, twice (on a tiny budget)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pdiff.commands import build_parser
from pdiff.config import load_config

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
TINY = ["task.param.k=12", "task.base.epochs=4", "task.param.warmup_steps=2", "train.ae_steps=8", "train.diffusion_steps=8",
        "train.eval_every=0", "train.checkpointing_steps=4", "train.num_final_models=8", "train.eval_num_models=8",
        "generator.autoencoder.channels=[8,16]",
        "generator.unet.block_out_channels=[8,16]", "generator.scheduler.num_train_timesteps=20", "generator.num_inference_steps=4"]


def commands(blocks: list[str] = BLOCKS) -> list[list[str]]:
    """Each command of the README's bash blocks (split on && and comments), as argv lists."""
    out = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split("&&"):
                part = part.strip().strip("()")
                if part:
                    out.append(shlex.split(part))
    return out


def pdiff_commands() -> list[list[str]]:
    found = []
    for argv in commands():
        argv = [a.removeprefix(".venv/bin/") for a in argv]
        if argv[0] == "pdiff":
            found.append(argv[1:])
        elif argv[:2] == ["accelerate", "launch"] and "pdiff/train.py" in argv:
            found.append(["train", *argv[argv.index("pdiff/train.py") + 1 :]])
        elif argv[:2] == ["accelerate", "launch"] and "pdiff.train" in argv:  # `-m pdiff.train`: an installed pdiff
            found.append(["train", *argv[argv.index("pdiff.train") + 1 :]])
    return found


def test_readme_has_the_two_setup_commands():
    setup = [b for b in BLOCKS if "pip install torch==2.14.1 torchvision==0.29.1" in b]
    assert len(setup) == 2
    assert "pytest -q" in setup[1] and "pytest -q" in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("argv", pdiff_commands(), ids=lambda a: " ".join(a)[:60])
def test_every_pdiff_command_parses_and_composes(argv):
    """Each README command means what it says: its options land in the parsed arguments and its
    overrides in the composed config, with the values written in the README."""
    from omegaconf import OmegaConf

    overrides = [a for a in argv[1:] if "=" in a and not a.startswith("-")]
    args = build_parser().parse_args([a for a in argv if a not in overrides] + overrides)
    assert args.command == argv[0]
    for option, value in zip(argv, argv[1:]):
        if option.startswith("--") and not value.startswith("-"):
            parsed = getattr(args, option[2:].replace("-", "_"))
            assert value in map(str, parsed) if isinstance(parsed, list) else str(parsed) == value, option
    if args.command in ("collect", "train", "config", "bench"):
        assert args.overrides == overrides
        cfg = load_config(overrides)  # raises on an unknown key or a bad value
        for key, _, value in (o.partition("=") for o in overrides):
            composed = OmegaConf.select(cfg, key)
            if OmegaConf.is_config(composed):  # a group choice, e.g. task=digits
                assert key != "task" or composed.name == value
            elif isinstance(composed, bool):
                assert composed == (value == "true"), key
            else:
                assert str(composed) == value, key


@pytest.mark.parametrize("script", ["launch/cifar100_resnet18_k200.sh", "launch/single_node.sh", "launch/sweep.sh"])
def test_readme_launcher_commands_dry_run(script):
    used = [argv for argv in commands() if argv and argv[0] == script]
    assert used, f"{script} is not in the README"
    for argv in used:
        args = [a for a in argv[1:] if a != "--dry-run"]
        if script.endswith("sweep.sh"):
            args = [a if not a.startswith("configs/") else str(REPO / a) for a in args]
        proc = subprocess.run([str(REPO / script), "--dry-run", *args], capture_output=True, text=True, cwd=REPO,
                              env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "NUM_GPUS": "2", "DRY_RUN": "1"}, timeout=60)
        assert proc.returncode == 0, proc.stderr


def quickstart_commands() -> list[list[str]]:
    """The Quickstart's command-line block, command by command."""
    return commands([next(b for b in BLOCKS if b.startswith("pdiff collect task=digits"))])


def on_a_tiny_budget(argv: list[str]) -> list[str]:
    """A README command with the TINY overrides in place of its own values for the same keys."""
    tiny_keys = {o.partition("=")[0] for o in TINY}
    return [a for a in argv if a.partition("=")[0] not in tiny_keys] + TINY


def test_the_readme_twice_in_one_folder(tmp_path, run_cli):
    """The README's commands in order, twice, in one folder, as a newcomer runs them (on a tiny budget):
    the set-up command (`pdiff run`), stopped during training and run again, then the Quickstart; then both again.
    Every command finishes every time: the set-up's rerun says each stage is done, the Quickstart replaces them."""
    setup = next(b for b in BLOCKS if "pip install -e . &&" in b and "pytest" not in b)
    steps = [argv for argv in commands() if argv and argv[0] == ".venv/bin/pdiff" and " ".join(argv) in setup.replace("\n", " ")]
    assert [s[1:] for s in steps] == [["run"]]
    quickstart = quickstart_commands()
    assert [argv[:2] for argv in quickstart] == [["pdiff", "collect"], ["accelerate", "launch"], ["pdiff", "sample"], ["pdiff", "evaluate"]]
    out = tmp_path / "outputs" / "digits"
    setup_run = ["run", "--num-models", "4", *TINY]

    first = run_cli(*setup_run, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    started = [line.split(":")[1].strip() for line in first.stdout.splitlines() if line.startswith("pdiff run: ") and "finished" not in line]
    assert started == ["collect", "train", "sample", "evaluate"]
    assert (out / "generator" / "model_index.json").exists() and (out / "samples" / "pdiff_dataset.json").exists()
    assert "verdict:" in first.stdout and f"report and plots: {Path('outputs/digits/eval')}/" in first.stdout

    # A stop during training: the generator and what follows are missing, the checkpoints are there.
    for name in ("generator", "samples", "eval"):
        shutil.rmtree(out / name)
    shutil.rmtree(out / "checkpoints" / "checkpoint-16")
    resumed = run_cli(*setup_run, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "collect: done already" in resumed.stdout and "resumed from" in resumed.stderr and "checkpoint-12" in resumed.stderr
    assert "Please verify your config" not in resumed.stderr  # diffusers' warning about the EMA's own config keys
    assert json.loads((out / "eval" / "report.json").read_text())["generated"]["count"] == 4

    accelerate = [str(Path(sys.executable).with_name("accelerate")), "launch"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for attempt in ("first", "second"):
        if attempt == "second":
            again = run_cli(*setup_run, cwd=tmp_path)
            assert again.returncode == 0, again.stderr[-3000:]
            assert again.stdout.count("done already") == 4 and "report and plots:" in again.stdout
        for argv in quickstart:
            if argv[0] == "pdiff":
                proc = run_cli(*(on_a_tiny_budget(argv[1:]) if argv[1] == "collect" else argv[1:]), cwd=tmp_path)
            else:  # accelerate launch [options] pdiff/train.py overrides: the script from this checkout
                script = argv.index("pdiff/train.py")
                cmd = [*accelerate, *argv[2:script], str(REPO / "pdiff" / "train.py"), *on_a_tiny_budget(argv[script + 1 :])]
                proc = subprocess.run(cmd, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
                # the summary that "Reading the report" reads, as `pdiff train` prints it
                assert "verdict:" in proc.stdout and f"generator: {Path('outputs/digits/generator')}" in proc.stdout, proc.stdout[-3000:]
            assert proc.returncode == 0, f"{attempt} Quickstart, {' '.join(argv)}:\n{proc.stderr[-3000:]}"
        assert "verdict:" in proc.stdout and (out / "eval" / "report.json").exists()


def test_without_overwrite_the_quickstart_says_what_to_do_first(tmp_path, run_cli):
    """A finished result is never replaced silently: the first line names the folder and both ways on."""
    (tmp_path / "outputs" / "digits" / "params").mkdir(parents=True)
    (tmp_path / "outputs" / "digits" / "params" / "pdiff_dataset.json").write_text("{}")
    collect = quickstart_commands()[0]
    proc = run_cli(*[a for a in collect[1:] if a != "overwrite=true"], cwd=tmp_path)
    assert proc.returncode == 2
    first_line = proc.stderr.strip().splitlines()[0]
    assert "outputs/digits/params" in first_line and "overwrite=true" in first_line and "output_dir=" in first_line, first_line
