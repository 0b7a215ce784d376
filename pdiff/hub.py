"""The Hugging Face Hub: downloads with one error mapping, one-commit uploads, model and dataset cards.

Generators and parameter datasets travel as safetensors, JSON, Parquet, a card and PNG plots; nothing
that needs unpickling is ever downloaded, and nothing is uploaded that is not on an allow-list.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .data import ParameterDataset
    from .evaluation import Report
    from .pipelines import PDiffPipeline

# What a generator repository may receive, and what loading one downloads: never pickles or code.
GENERATOR_UPLOAD_PATTERNS = ["*.json", "*.safetensors", "README.md", "*.png"]
GENERATOR_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors"]
DATASET_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.parquet", "*.arrow", "README.md"]


def check_push(hub_cfg: Any, repo_key: str, what: str) -> None:
    """Refuse before any work a `hub.push_to_hub=true` that could not upload: no repo id, or offline mode."""
    from huggingface_hub import constants

    from .config import ConfigError

    if not hub_cfg.push_to_hub:
        return
    if not hub_cfg.get(repo_key):
        raise ConfigError(f"hub.push_to_hub=true needs hub.{repo_key}=<user>/<name>")
    if constants.is_offline_mode():
        raise ConfigError(f"hub.push_to_hub=true cannot upload in offline mode (HF_HUB_OFFLINE=1): unset it, or push the {what} later")


def looks_like_path(name: str) -> bool:
    """A name that can only be a local path (so a missing folder is not looked up on the Hub)."""
    return name.startswith((".", "/", "~")) or os.sep in name.replace("/", "") or name.count("/") > 1 or Path(name).is_absolute()


def download(repo_id: str, *, repo_type: str, allow_patterns: list[str], revision: str | None = None, what: str | None = None, **hub_kwargs: Any) -> Path:
    """`snapshot_download` of a repo (or its cached snapshot); every failure is one FileNotFoundError saying why."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import validate_repo_id

    what = what or ("generator" if repo_type == "model" else "parameter dataset")
    if looks_like_path(repo_id):
        raise FileNotFoundError(f"no {what} folder at {repo_id}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise FileNotFoundError(f"{repo_id!r} is neither an existing {what} folder nor a valid Hub repo id (<user>/<name>)") from err
    where = f"the {what} repo {repo_id!r} (revision {revision or 'main'})"
    if Path(repo_id).parent.is_dir():  # `out/none` beside a local `out/`: most likely a mistyped folder, so say that first
        where = f"there is no {what} folder at {repo_id}, and {where}"
    offline = constants.is_offline_mode() or bool(hub_kwargs.get("local_files_only"))
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=allow_patterns, **hub_kwargs))
    except RevisionNotFoundError as err:
        raise FileNotFoundError(f"{where}: the revision does not exist on {constants.ENDPOINT}; pass an existing branch, tag or commit") from err
    except GatedRepoError as err:
        raise FileNotFoundError(f"{where} is gated: request access on the Hub and log in (`hf auth login`)") from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(f"{where} was not found on {constants.ENDPOINT} (if it is private, log in with `hf auth login` or pass token=)") from err
    except LocalEntryNotFoundError as err:
        if offline:
            raise FileNotFoundError(
                f"{where} is not in the Hugging Face cache ({hub_kwargs.get('cache_dir') or constants.HF_HUB_CACHE}) and "
                f"offline mode is on (HF_HUB_OFFLINE=1{' / local_files_only=True' if hub_kwargs.get('local_files_only') else ''}): "
                "download it once online, or pass a local folder"
            ) from err
        reason = " ".join(str(err).split())  # huggingface_hub's text is long and repeats itself
        reason = reason if len(reason) <= 120 else reason[:117] + "..."
        raise FileNotFoundError(f"{where} could not be downloaded from {constants.ENDPOINT} and is not in the cache ({reason})") from err
    except HfHubHTTPError as err:
        raise FileNotFoundError(f"{where} could not be downloaded from {constants.ENDPOINT}: {err}") from err


def upload(folder: str | os.PathLike, repo_id: str, *, repo_type: str = "model", allow_patterns: list[str] | None = None, private: bool | None = None,
           token: str | None = None, commit_message: str | None = None, create_pr: bool = False, revision: str | None = None) -> str:
    """Create the repo if needed and upload the folder's files (those matching `allow_patterns`) in one commit."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True).repo_id
    info = api.upload_folder(repo_id=repo_id, repo_type=repo_type, folder_path=folder, allow_patterns=allow_patterns, create_pr=create_pr, revision=revision,
                             commit_message=commit_message or f"Upload pdiff {'generator' if repo_type == 'model' else 'parameter dataset'}")
    return str(info)


# -- cards ------------------------------------------------------------------------------------------


def generator_card(pipe: "PDiffPipeline", report: "Report | None", plots: list[str]):
    """The model card (README.md) of a generator: what it generates, how to use it, its evaluation."""
    from huggingface_hub import ModelCard, ModelCardData

    target, layout = pipe.target, pipe.target.layout
    task = dict(target.config.task or {})
    n_gen = sum(p.numel() for p in pipe.unet.parameters()) + sum(p.numel() for p in pipe.autoencoder.parameters())
    # library_name pdiff: the Hub would otherwise offer a diffusers snippet that cannot load a Hub id without remote code.
    data = ModelCardData(library_name="pdiff", tags=["pdiff", "diffusers", "parameter-generation", "neural-network-diffusion"], pipeline_tag="unconditional-generation")
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

{_evaluation_section(report)}

{chr(10).join(f"![{p}]({p})" for p in plots)}

## Task

```json
{json.dumps(task, indent=2, sort_keys=True) if task else "{}"}
```

## Files

Only safetensors and JSON: `autoencoder/`, `unet/`, `scheduler/`, `target/` (the frozen base network and the
parameter layout), `model_index.json`{', `report.json` (the full evaluation report)' if report else ''}. Loading reads
safetensors only and runs no code from this repository.
"""
    return ModelCard(content)


def _evaluation_section(report: "Report | None") -> str:
    if report is None:
        return "No evaluation report was saved with this generator."
    from .evaluation.render import markdown_table, variety_text, verdicts

    text = (f"Validation: {report.splits['val']} examples, test: {report.splits['test']} examples. "
            f"Networks are selected on the validation split only; test accuracy is only reported.\n\n{markdown_table(report)}\n")
    for verdict in verdicts(report):
        if verdict.text:
            text += f"\n**Verdict:** {verdict.text}\n"
    variety = variety_text(report)
    if variety:
        text += f"\n**Variety** (how alike the networks of each set are: IoU of test errors with the nearest other network of the set, then how many generated networks are near-duplicates): {variety}.\n"
    if report.selected:
        text += f"\nSelected generator: training step {report.selected.get('step')}, chosen on {report.selected.get('selected_on', 'validation')}"
        if "temperature" in report.selected:
            text += f"; sampling temperature {report.selected['temperature']:g}, {report.selected['temperature_rule']}"
        text += ".\n"
    return text


def dataset_card(dataset: "ParameterDataset"):
    """The dataset card (README.md) of a parameter dataset on the Hub."""
    import numpy as np
    import yaml
    from huggingface_hub import DatasetCard

    from .data.parameter_dataset import BASE_WEIGHTS_FILE, METADATA_FILE

    acc = dataset.column("test_accuracy")
    name = dataset.task_config.get("name")
    header = {
        "tags": ["pdiff", "parameter-generation", "neural-network-diffusion"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}],
    }
    body = f"""# pdiff parameter dataset: {name}

{len(dataset)} checkpoints of {dataset.dim} parameters ({', '.join(dataset.layout.names)}) of a `{dataset.task_config['network']['name']}`
trained on `{name}`, collected with pdiff (Neural Network Diffusion, arXiv 2402.13144).

| | min | median | max |
|---|---|---|---|
| test accuracy | {acc.min():.4f} | {np.median(acc):.4f} | {acc.max():.4f} |

Files: `data/*.parquet` (one row per checkpoint: `params`, `step`, `seed`, validation/test accuracy and loss),
`{METADATA_FILE}` (parameter layout and the task config), `{BASE_WEIGHTS_FILE}` (the frozen rest of the network).

```python
from pdiff import ParameterDataset
ds = ParameterDataset.from_pretrained("<this repo>")
net = ds.build_network(0)  # a ready torch.nn.Module
```
"""
    return DatasetCard(f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n\n{body}")
