"""The model card of a generator repository (README.md), built with huggingface_hub's `ModelCard`."""

from __future__ import annotations

import json
from typing import Any

from huggingface_hub import ModelCard, ModelCardData


def _accuracy_table(report: dict[str, Any]) -> str:
    """Markdown table of the accuracy statistics in a pdiff evaluation report, if it has them."""
    rows = []
    for group, stats in (report.get("accuracy") or {}).items():
        for split, s in stats.items():
            if isinstance(s, dict) and "mean" in s:
                rows.append(f"| {group} | {split} | {s.get('best', s.get('max', float('nan'))):.4f} | {s['mean']:.4f} | {s.get('median', float('nan')):.4f} | {s.get('min', float('nan')):.4f} |")
    if not rows:
        return ""
    return "| networks | split | best | mean | median | min |\n|---|---|---|---|---|---|\n" + "\n".join(rows)


def generator_model_card(pipe, report: dict[str, Any] | None, plots: list[str]) -> ModelCard:
    target = pipe.target
    task = target.config.task or {}
    layout = target.layout
    n_gen = sum(p.numel() for p in pipe.unet.parameters()) + sum(p.numel() for p in pipe.autoencoder.parameters())
    data = ModelCardData(library_name="diffusers", tags=["pdiff", "parameter-generation", "neural-network-diffusion"], pipeline_tag="unconditional-generation")
    table = _accuracy_table(report or {})
    verdict = (report or {}).get("verdict", "")
    summary = json.dumps((report or {}).get("summary", {}), indent=2) if report and "summary" in report else ""
    images = "\n".join(f"![{p}]({p})" for p in plots)
    content = f"""---
{data.to_yaml()}
---

# pdiff generator: {task.get('name', 'unknown task')}

A latent diffusion model that generates the parameters `{', '.join(layout.names)}` ({layout.dim} numbers) of a
`{target.config.network.get('name')}` network, trained with pdiff (Neural Network Diffusion, arXiv 2402.13144).
Generator size: {n_gen:,} parameters (autoencoder + UNet1D); sampler: `{type(pipe.scheduler).__name__}`.

## Use

```python
import torch
from pdiff import PDiffPipeline

pipe = PDiffPipeline.from_pretrained("<this repo>")
params = pipe(num_models=100, generator=torch.Generator().manual_seed(0)).params
networks = pipe.networks(params)  # ready torch.nn.Modules in eval mode
```

## Evaluation

Generated networks against the checkpoints the generator was trained on (selection on the validation split only).

{table or 'No evaluation report was saved with this generator.'}

{verdict}

{('```json' + chr(10) + summary + chr(10) + '```') if summary else ''}

{images}

## Files

Only safetensors and JSON: `autoencoder/`, `unet/`, `scheduler/`, `target/` (the frozen base network and the
parameter layout), `model_index.json`{', `report.json`' if report else ''}.
"""
    return ModelCard(content)
