"""`pdiff evaluate`: generated networks against the originals, the baselines and novelty; report.json + plots.

    pdiff evaluate --dataset outputs/digits/params --generated outputs/digits/samples --out outputs/digits/eval

`--generated` takes a parameter dataset (`pdiff sample --format dataset`), a folder of networks
(`pdiff sample`'s default output), or one [N, D] tensor in a .pt, .safetensors or .npy file.
`--curve-model` adds the generator's accuracy-novelty curve: it samples that generator at each of
`--curve-temperatures` (with the DDIM eta `pdiff sample` recorded for the generated set, else 0) and scores
every point like the generated set.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .arguments import add_trust_flag, non_empty_path, non_negative_float, positive_float, positive_int, seed

CURVE_TEMPERATURES = (0.5, 0.75, 1.0, 1.25)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="the original parameter dataset: folder or Hub dataset id")
    p.add_argument("--generated", required=True, help="generated parameters: a parameter dataset, a `pdiff sample` folder, or a .pt/.safetensors/.npy [N, D] tensor")
    p.add_argument("--out", type=non_empty_path, required=True, help="folder for report.json and the PNG plots")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: the GPU if there is one)")
    p.add_argument("--noise-scales", type=non_negative_float, nargs="*", default=None, help="noise baseline scales (default: the task's eval.noise_scales, else 1 2 4 8 16 32; none given: no noise baseline)")
    p.add_argument("--average-noise-scales", type=non_negative_float, nargs="*", default=None,
                   help="scales of the weight average plus noise (default: the task's eval.average_noise_scales, else 1 2 4; none given: left out)")
    p.add_argument("--noise-mode", choices=("spread", "absolute"), default="spread", help="spread: scale x each tensor's std across the checkpoints; absolute: the scale is the std")
    p.add_argument("--num-noise-models", type=positive_int, default=None, help="networks per noise scale (default: the task's eval.num_noise_models, else as many as generated)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the noise baseline")
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per batch (default: the task's eval.batch_size)")
    p.add_argument("--networks-per-chunk", type=positive_int, default=None, help="networks scored together (default: sized from free memory)")
    p.add_argument("--curve-model", default=None, help="a generator (folder or Hub id) whose accuracy-novelty curve to add: sampled at each --curve-temperatures")
    p.add_argument("--curve-temperatures", type=positive_float, nargs="+", default=None, help="with --curve-model: sampling temperatures of the curve (default 0.5 0.75 1 1.25)")
    p.add_argument("--curve-num-models", type=positive_int, default=None, help="with --curve-model: networks per curve point (default 50)")
    p.add_argument("--generated-temperature", type=positive_float, default=None,
                   help="the temperature --generated was sampled at, to place it on the curve (default: what `pdiff sample --format dataset` recorded)")
    p.add_argument("--no-plots", action="store_true", help="write only report.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    add_trust_flag(p)


def run(args: argparse.Namespace) -> None:
    from ..evaluation import REPORT_FILE
    from ..io import check_writable, output_lock

    out = Path(args.out)
    if not args.curve_model and (args.curve_temperatures or args.curve_num_models):
        raise ValueError("--curve-temperatures and --curve-num-models shape the curve of --curve-model: add --curve-model GENERATOR, or drop them")
    args.curve_temperatures, args.curve_num_models = args.curve_temperatures or list(CURVE_TEMPERATURES), args.curve_num_models or 50
    if (out / REPORT_FILE).exists() and not args.overwrite:
        raise FileExistsError(f"{out / REPORT_FILE} already exists; pass --overwrite to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder for report.json and the plots")
    check_writable(out)
    with output_lock(out, "evaluate"):  # a second report into the same --out stops at once
        report_into(args, out)


def report_into(args: argparse.Namespace, out: Path) -> None:
    import sys

    from ..data import ParameterDataset
    from ..evaluation import evaluate_and_write, load_generated
    from ..evaluation.render import format_summary
    from ..runtime import resolve_device

    device = resolve_device(args.device)
    originals = ParameterDataset.from_pretrained(args.dataset, trust_network_code=args.trust_network_code)
    generated = load_generated(args.generated, originals)
    recorded = recorded_sampling(args.generated)
    curve = curve_samples(args, originals, device, recorded.get("eta") or 0.0) if args.curve_model else None
    if Path(args.generated).is_file():
        print(f"note: {args.generated} is a bare tensor and names no network; pdiff checks its shape only. Make sure it was "
              f"generated for {args.dataset}'s frozen weights (a `pdiff sample` folder or dataset is checked).", file=sys.stderr)
    report, paths = evaluate_and_write(
        originals, generated, out, plots=not args.no_plots, device=device, seed=args.seed, batch_size=args.batch_size,
        noise_scales=args.noise_scales, average_noise_scales=args.average_noise_scales, noise_mode=args.noise_mode,
        num_noise_models=args.num_noise_models, networks_per_chunk=args.networks_per_chunk, curve=curve,
        generated_temperature=args.generated_temperature or recorded.get("temperature"),
    )
    print(format_summary(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if Path(args.generated).resolve() == Path(args.dataset).resolve():
        print("note: --generated is --dataset itself: the report compares the originals with themselves (nearest IoU 1.000)", file=sys.stderr)


def curve_samples(args: argparse.Namespace, originals, device, eta: float) -> dict:
    """{temperature: vectors} from `--curve-model`, every point from the same seeded draws, scaled, with the DDIM eta
    the generated set was sampled with: a curve is one sampler's, so the generated set belongs on it."""
    from ..evaluation.inputs import check_base_network
    from ..sampling import load_generator, sample_networks

    pipe = load_generator(args.curve_model, str(device), trust_network_code=args.trust_network_code)
    check_base_network(originals, pipe.layout, pipe.target.net.state_dict(), f"--curve-model {args.curve_model}")  # another network's generator: refused
    return {t: sample_networks(pipe, args.curve_num_models, None, args.seed, t, eta) for t in args.curve_temperatures}


def recorded_sampling(generated: str) -> dict:
    """What a `pdiff sample --format dataset` folder recorded of its sampling (`temperature`, `eta`), if anything."""
    from ..data.parameter_dataset import METADATA_FILE
    from ..io import read_json

    meta = Path(generated) / METADATA_FILE
    return (read_json(meta).get("info") or {}) if meta.is_file() else {}
