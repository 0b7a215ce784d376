"""`pdiff import-checkpoints --from SOURCE ... [key=value ...]`: a parameter dataset from existing checkpoints.

    pdiff import-checkpoints --from 'runs/*.safetensors' task=custom task.network._target_=my_model.Net \\
        task.data.name=images/ task.param.patterns='[fc.*]' output_dir=outputs/mine
    pdiff import-checkpoints --from you/run-1 you/run-2 task=fashion_mnist     # Hub model repos (safetensors)

The dataset goes to `dataset_dir` (default `<output_dir>/params`), exactly as `pdiff collect` writes it,
so `pdiff train` and the rest follow unchanged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .arguments import add_overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="sources", nargs="+", required=True, metavar="SOURCE",
                   help="checkpoint files or globs (.safetensors, .pt/.pth/.bin read with weights_only), or Hub model repo ids")
    p.add_argument("--base", default=None, help="the checkpoint whose other weights are the frozen base (default: the first)")
    p.add_argument("--revision", default=None, help="revision of the Hub repos")
    p.add_argument("--no-eval", action="store_true", help="do not score the checkpoints on the task's val/test splits")
    add_overrides(p)


def run(args: argparse.Namespace) -> None:
    from ..collect import summarize
    from ..config import load_config, to_dict
    from ..data.from_checkpoints import import_checkpoints
    from ..io import check_output_dir, output_lock

    # `--from` takes every word after it; the key=value ones among them are config overrides.
    overrides = [*args.overrides, *(s for s in args.sources if "=" in s)]
    sources = [s for s in args.sources if "=" not in s]
    cfg = load_config(overrides)
    check_output_dir(cfg.dataset_dir, bool(cfg.overwrite), "parameter dataset")
    with output_lock(Path(cfg.dataset_dir).parent, "import-checkpoints"):
        dataset = import_checkpoints(sources, to_dict(cfg.task), base=args.base, revision=args.revision, score=not args.no_eval)
        dataset.save_to_disk(cfg.dataset_dir, overwrite=bool(cfg.overwrite))
    print(f"saved {cfg.dataset_dir}\n{summarize(dataset).replace('collected in', 'imported in')}")
    warn_at_chance(dataset, cfg.task.name)


def warn_at_chance(dataset, task_name: str) -> None:
    """Checkpoints scoring at chance were most likely trained for another task than the one named: say so."""
    import sys

    if "val_accuracy" not in dataset.rows.column_names:  # --no-eval
        return
    chance = 1 / int(dataset.info.get("num_classes") or 2)
    mean = float(dataset.column("val_accuracy").mean())
    if mean < 1.5 * chance:
        print(f"note: the checkpoints score {mean:.3f} on task {task_name}'s validation split, about chance ({chance:.2f}): "
              "were they trained for this task (task=...)?", file=sys.stderr)
