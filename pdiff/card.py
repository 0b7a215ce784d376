"""The model card of a generator repository (README.md), built with huggingface_hub's `ModelCard`.

The evaluation table is read from the report `pdiff.evaluate` writes (and `train.py` saves next to the
generator): originals, generated networks, the weight-average and noise baselines, and novelty.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from huggingface_hub import ModelCard, ModelCardData


def _num(value: Any, fmt: str = ".4f") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "–"


def _row(name: str, group: Mapping[str, Any], similarity: Mapping[str, Any] | None) -> str:
    val, test = group.get("val", {}), group.get("test", {})
    iou = (similarity or {}).get("iou", {}).get("mean")
    return (
        f"| {name} | {group.get('count', '–')} | {_num(val.get('mean'))} | {_num(val.get('best'))} | "
        f"{_num(group.get('best_on_val', {}).get('test_accuracy'))} | {_num(test.get('mean'))} | {_num(test.get('min'))} | "
        f"{_num(test.get('best'))} | {_num(iou, '.3f')} |"
    )


def evaluation_table(report: Mapping[str, Any] | None) -> str:
    """Markdown table of a pdiff evaluation report (schema of `pdiff.evaluate`); empty if it has none."""
    if not report or "generated" not in report or "originals" not in report:
        return ""
    sim = report.get("similarity") or {}
    rows = [
        "| networks | n | val mean | val best | test of best-on-val | test mean | test min | test max | nearest-original IoU |",
        "|---|---|---|---|---|---|---|---|---|",
        _row("original checkpoints", report["originals"], sim.get("original_original")),
        _row("generated", report["generated"], sim.get("generated_original")),
    ]
    baselines = report.get("baselines") or {}
    avg = baselines.get("weight_average")
    if avg:
        rows.append(
            f"| weight average of the originals | 1 | {_num(avg.get('val_accuracy'))} | {_num(avg.get('val_accuracy'))} | "
            f"{_num(avg.get('test_accuracy'))} | {_num(avg.get('test_accuracy'))} | {_num(avg.get('test_accuracy'))} | "
            f"{_num(avg.get('test_accuracy'))} | {_num(avg.get('nearest_original_iou'), '.3f')} |"
        )
    noise = baselines.get("noise") or {}
    for entry in noise.get("scales", []):
        rows.append(_row(f"originals + noise x{entry['scale']:g} ({noise.get('mode', '')})", entry, entry.get("similarity_to_originals")))
    return "\n".join(rows)


def generator_model_card(pipe, report: dict[str, Any] | None, plots: list[str]) -> ModelCard:
    target = pipe.target
    task = dict(target.config.task or {})
    layout = target.layout
    n_gen = sum(p.numel() for p in pipe.unet.parameters()) + sum(p.numel() for p in pipe.autoencoder.parameters())
    # library_name pdiff: the Hub would otherwise offer a diffusers snippet that cannot load a Hub id without remote code.
    data = ModelCardData(library_name="pdiff", tags=["pdiff", "diffusers", "parameter-generation", "neural-network-diffusion"], pipeline_tag="unconditional-generation")
    table = evaluation_table(report)
    verdict = ((report or {}).get("verdict") or {}).get("text", "")
    selected = (report or {}).get("selected")
    splits = (report or {}).get("splits") or {}
    images = "\n".join(f"![{p}]({p})" for p in plots)
    task_json = json.dumps(task, indent=2, sort_keys=True) if task else "{}"
    evaluation = "No evaluation report was saved with this generator."
    if table:
        sizes = f"Validation: {splits['val']} examples, test: {splits['test']} examples. " if {"val", "test"} <= set(splits) else ""
        evaluation = f"{sizes}Networks are selected on the validation split only; test accuracy is only reported.\n\n{table}\n"
        if verdict:
            evaluation += f"\n**Verdict:** {verdict}\n"
        if selected:
            evaluation += f"\nSelected generator: training step {selected.get('step')}, chosen on {selected.get('selected_on', 'validation')}.\n"
    content = f"""---
{data.to_yaml()}
---

# pdiff generator: {task.get('name', 'unknown task')}

A latent diffusion model that generates {layout.dim:,} parameters ({len(layout.names)} tensors: `{', '.join(layout.names)}`) of a
`{target.config.network.get('name')}` network for the task `{task.get('name', 'unknown')}`, trained with pdiff
(Neural Network Diffusion, arXiv 2402.13144). The rest of the network is fixed (the base weights in `target/`).

- Generated parameters per network: {layout.dim:,}
- Generator size: {n_gen:,} parameters (autoencoder + UNet1D)
- Sampler: `{type(pipe.scheduler).__name__}` ({pipe.scheduler.config.num_train_timesteps} training timesteps)

## Use

```python
import torch
from pdiff import PDiffPipeline

pipe = PDiffPipeline.from_pretrained("<this repo>")
params = pipe(num_models=100, generator=torch.Generator().manual_seed(0)).params  # [100, {layout.dim}]
networks = pipe.networks(params)  # ready torch.nn.Modules in eval mode
```

or from the command line: `pdiff sample --model <this repo> --num-models 100 --out samples/ --evaluate`.

## Evaluation

{evaluation}

{images}

## Task

```json
{task_json}
```

## Files

Only safetensors and JSON: `autoencoder/`, `unet/`, `scheduler/`, `target/` (the frozen base network and the
parameter layout), `model_index.json`{', `report.json` (the full evaluation report)' if report else ''}. Loading reads
safetensors only and runs no code from this repository.
"""
    return ModelCard(content)
