"""`pdiff run [key=value ...]`: the whole method, collect -> train -> sample -> evaluate, resumable.

Each stage runs as its own `pdiff <stage>` process and is skipped when its output is complete; an
interrupted training resumes from its latest checkpoint. Running the same command again after a stop
(Ctrl-C, a crash, a reboot) therefore picks up where it stopped, and after a finished run it only says
where the results are. A rerun with other settings is refused (`pdiff_run.json` records the run's): it would
hand back stages made with the old ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .arguments import add_overrides, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-models", type=positive_int, default=100, help="networks to sample and evaluate at the end")
    add_overrides(p)


RUN_RECORD = "pdiff_run.json"  # the settings a run's finished stages were made with
COSMETIC = ("overwrite", "cpu", "hub.", "train.report_to", "train.run_name", "train.wandb_project", "train.log_every")  # keys that change no result


def run(args: argparse.Namespace) -> None:
    import subprocess
    import sys

    from ..config import ConfigError, flatten, load_config, to_dict
    from ..io import write_json

    cfg = load_config(args.overrides)  # bad keys fail here, before any stage starts
    if int(cfg.task.param.k) < 2:
        raise ConfigError(f"task.param.k={cfg.task.param.k}: a generator needs at least 2 checkpoints to learn their spread")
    out, dataset, generator = Path(cfg.output_dir), Path(cfg.dataset_dir), Path(cfg.generator_dir)
    settings = {**flatten(to_dict(cfg)), "--num-models": args.num_models}
    check_same_settings(out / RUN_RECORD, settings)
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
        if not (out / RUN_RECORD).exists():  # from the first finished stage on, a rerun must ask for the same run
            write_json(out / RUN_RECORD, settings)
    print(f"pdiff run: finished. Parameters: {dataset}  generator: {generator}  report and plots: {evaluation}/")


def check_samples_fit(dataset_dir, num_models: int, cfg) -> None:
    """`--num-models` networks, their report's noise copies included, must fit in memory."""
    from ..data import ParameterDataset
    from ..evaluation.report import check_report_fits, noise_counts

    dim = ParameterDataset.from_pretrained(dataset_dir).dim
    check_report_fits(dim, num_models, *noise_counts(cfg.task.eval, num_models), f"--num-models {num_models}: the samples and their report's networks of {dim} parameters",
                      "lower --num-models")


def check_same_settings(record: Path, settings: dict) -> None:
    """A rerun continues the run it finds only if it asks for the same one: with other settings its finished
    stages would be handed back as they are, made with the old ones."""
    from ..config import ConfigError
    from ..io import read_json

    if not record.exists():
        return
    saved = read_json(record)
    changed = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k) and not k.startswith(COSMETIC)]
    if changed:
        shown = "; ".join(f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now" for k in changed[:3])
        raise ConfigError(f"{record.parent} holds a pdiff run made with other settings ({shown}{'; ...' if len(changed) > 3 else ''}), whose finished "
                          "stages would be reused as they are: run it again with its own settings, or give another output_dir")
