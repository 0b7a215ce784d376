"""`pdiff run [key=value ...]`: the whole method, collect -> train -> sample -> evaluate, resumable.

Each stage runs as its own `pdiff <stage>` process and is skipped when its output is complete; an
interrupted training resumes from its latest checkpoint. Running the same command again after a stop
(Ctrl-C, a crash, a reboot) therefore picks up where it stopped, and after a finished run it only says
where the results are.
"""

from __future__ import annotations

import argparse

from .arguments import add_overrides, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-models", type=positive_int, default=100, help="networks to sample and evaluate at the end")
    add_overrides(p)


def run(args: argparse.Namespace) -> None:
    import subprocess
    import sys
    from pathlib import Path

    from ..config import ConfigError, load_config

    cfg = load_config(args.overrides)  # bad keys fail here, before any stage starts
    if int(cfg.task.param.k) < 2:
        raise ConfigError(f"task.param.k={cfg.task.param.k}: a generator needs at least 2 checkpoints to learn their spread")
    out, dataset, generator = Path(cfg.output_dir), Path(cfg.dataset_dir), Path(cfg.generator_dir)
    samples, evaluation = out / "samples", out / "eval"
    stages = [
        ("collect", dataset / "pdiff_dataset.json", ["collect", *args.overrides]),
        ("train", generator / "model_index.json", ["train", *args.overrides, "train.resume_from_checkpoint=latest"]),
        ("sample", samples / "pdiff_dataset.json", ["sample", "--model", str(generator), "--num-models", str(args.num_models), "--out", str(samples),
                                                    "--format", "dataset", "--overwrite", *(["--device", "cpu"] if cfg.cpu else [])]),
        ("evaluate", evaluation / "report.json", ["evaluate", "--dataset", str(dataset), "--generated", str(samples), "--out", str(evaluation),
                                                  "--overwrite", *(["--device", "cpu"] if cfg.cpu else [])]),
    ]
    for name, done_when, argv in stages:
        if done_when.exists():
            print(f"pdiff run: {name}: done already ({done_when.parent})", flush=True)
            continue
        if name == "train":  # the dataset's size is known now: refuse a sample and report that cannot fit before training
            check_samples_fit(dataset, args.num_models, cfg)
        print(f"pdiff run: {name}: pdiff {' '.join(argv)}", flush=True)
        status = subprocess.run([sys.executable, "-m", "pdiff", *argv]).returncode
        if status:
            raise SystemExit(status)  # the stage has said what went wrong; run the same command again to continue
    print(f"pdiff run: finished. Parameters: {dataset}  generator: {generator}  report and plots: {evaluation}/")


def check_samples_fit(dataset_dir, num_models: int, cfg) -> None:
    """`--num-models` networks, their report's noise copies included, must fit in memory."""
    from ..data import ParameterDataset
    from ..evaluation.report import check_report_fits, noise_counts

    dim = ParameterDataset.from_pretrained(dataset_dir).dim
    check_report_fits(dim, num_models, *noise_counts(cfg.task.eval, num_models), f"--num-models {num_models}: the samples and their report's networks of {dim} parameters",
                      "lower --num-models")
