"""Two guided samplers tried on a Fashion-MNIST generator (neither is in pdiff: neither moved the trade-off).

    python figures/fashion-mnist/guidance.py RUN OUT DATASET loss T:S [T:S ...]
    python figures/fashion-mnist/guidance.py RUN OUT DATASET auto T:W [T:W ...]

RUN is a `pdiff train` output folder (its `generator/`, and for autoguidance `checkpoints/checkpoint-1000/unet_ema`:
the denoiser's EMA halfway through the default 500 + 1,000 steps, kept by the default `train.checkpointing_steps=500`
and `train.checkpoints_total_limit=2`).

* loss: at every DDIM step the predicted clean latent is moved downhill by S x the gradient of the training-split
  cross-entropy (4,096 training images, 128 a step) of the networks it decodes to, then written back as the
  noise prediction.
* auto: autoguidance (Karras et al. 2024), eps = eps_half + W (eps - eps_half).

200 networks per set, seed 0, 100 steps; each goes through `pdiff evaluate --noise-scales 1 1.5 2`; one line per set,
and OUT/KIND.json keeps the points (copied by hand into tradeoff_large.json's `guidance`).
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet1DModel
from score_set import score_set

from pdiff.evaluation.scoring import SuffixScorer
from pdiff.sampling import load_generator, task_of


def training_loss(pipe, num_images=4096):
    """loss(params [n, D], step) -> per-network cross-entropy on one 128-image batch of the training split,
    differentiable: pdiff's scorer runs the frozen prefix once, then vmaps the generated stages."""
    net, data = pipe.target.net, task_of(pipe).data
    scorer = SuffixScorer(net, pipe.layout)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:num_images]
    with torch.no_grad():
        features = scorer.prefix(data.prepare(data.train.images[order]))
    labels = data.train.labels[order]

    def loss(params, step, batch=128):
        lo = (step * batch) % len(labels)
        x, y = features[lo : lo + batch], labels[lo : lo + batch]
        logits = scorer.batched({scorer.key + name: value for name, value in pipe.layout.unflatten(params).items()}, x)  # [n, batch, classes]
        return F.cross_entropy(logits.flatten(0, 1), y.repeat(len(params)), reduction="none").view(len(params), -1).mean(1)

    return loss


def sample(pipe, temperature, guide, num_models=200, steps=100):
    ae, unet, scheduler = pipe.autoencoder, pipe.unet, pipe.scheduler
    z = torch.randn((num_models, *ae.latent_shape), generator=torch.Generator().manual_seed(0)) * temperature
    scheduler.set_timesteps(steps)
    for i, t in enumerate(scheduler.timesteps):
        with torch.no_grad():
            eps = unet(z, t).sample
        eps = guide(z, t, eps, i)
        with torch.no_grad():
            z = scheduler.step(eps, t, z).prev_sample
    return ae.latents_to_params(z)


def loss_guide(pipe, scale):
    loss, ae, alphas = training_loss(pipe), pipe.autoencoder, pipe.scheduler.alphas_cumprod

    def guide(z, t, eps, step):
        ab = alphas[t]
        x0 = ((z - (1 - ab).sqrt() * eps) / ab.sqrt()).detach().requires_grad_()
        params = ae.denormalize(ae.decode(x0 / ae.config.scaling_factor).float())
        (grad,) = torch.autograd.grad(loss(params, step).sum(), x0)
        return eps + scale * (ab / (1 - ab)).sqrt() * grad  # x0 - scale * grad, as a noise prediction

    return guide


def auto_guide(run, weight):
    half = UNet1DModel.from_pretrained(f"{run}/checkpoints/checkpoint-1000/unet_ema").eval()

    @torch.no_grad()
    def guide(z, t, eps, step):
        weak = half(z, t).sample
        return weak + weight * (eps - weak)

    return guide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a `pdiff train` output folder (generator/ and checkpoints/checkpoint-1000/)")
    parser.add_argument("out", type=Path)
    parser.add_argument("dataset", help="the parameter dataset the generator was trained on")
    parser.add_argument("kind", choices=("loss", "auto"))
    parser.add_argument("settings", nargs="+", metavar="T:S", help="temperature:strength (loss: the step s; auto: the weight w)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = load_generator(f"{args.run}/generator", "cpu")
    points = {}
    for setting in args.settings:
        temperature, strength = map(float, setting.split(":"))
        guide = loss_guide(pipe, strength) if args.kind == "loss" else auto_guide(args.run, strength)
        tag = f"{args.kind}_T{temperature:g}_{strength:g}"
        points[tag] = score_set(args.dataset, sample(pipe, temperature, guide), args.out, tag)
    (args.out / f"{args.kind}.json").write_text(json.dumps(points, indent=1) + "\n")


if __name__ == "__main__":
    main()
