"""Two guided samplers tried on a Fashion-MNIST generator (neither is in pdiff: neither moved the trade-off).

    python figures/fashion-mnist/guidance.py RUN OUT DATASET loss T:S [T:S ...]
    python figures/fashion-mnist/guidance.py RUN OUT DATASET auto T:W [T:W ...]

RUN is a `pdiff train` output folder (its `generator/`, and `checkpoints/checkpoint-1000/unet_ema`: the
denoiser's EMA halfway through the default 500 + 1,000 steps).

* loss: at every DDIM step the predicted clean latent is moved by S x the gradient of the training-split
  cross-entropy (4,096 training images, 128 a step) of the networks it decodes to, and written back as the
  noise prediction. Only for layouts generating `bn3.*` and `fc.*` of pdiff's SmallCNN (the head is written out).
* auto: autoguidance (Karras et al. 2024), eps = eps_half + W (eps - eps_half).

200 networks per set, seed 0, 100 steps; each goes through `pdiff evaluate --noise-scales 1 1.5 2`; one line per set.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet1DModel
from safetensors.torch import save_file

from pdiff.evaluation.report import Report
from pdiff.sampling import load_generator, task_of


def training_head_loss(pipe, num_images=4096):
    """loss(params [n, D], step) -> per-network cross-entropy on one 128-image batch of the training split."""
    net, data = pipe.target.net.eval(), task_of(pipe).data
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:num_images]
    with torch.no_grad():
        features = net.run_stages(data.prepare(data.train.images[order]), 0, net.first_stage_holding(pipe.layout.names)).flatten(2)
    labels, bn = data.train.labels[order], net.bn3

    def loss(params, step, batch=128):
        p = pipe.layout.unflatten(params)
        lo = (step * batch) % len(labels)
        x, y = features[lo : lo + batch], labels[lo : lo + batch]
        a = p["bn3.weight"] * torch.rsqrt(bn.running_var + bn.eps)  # eval batch-norm as x * a + b
        b = p["bn3.bias"] - bn.running_mean * a
        pooled = torch.relu(a[:, None, :, None] * x[None] + b[:, None, :, None]).mean(-1)
        logits = torch.einsum("nbc,nkc->nbk", pooled, p["fc.weight"]) + p["fc.bias"][:, None]
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
    loss, ae, alphas = training_head_loss(pipe), pipe.autoencoder, pipe.scheduler.alphas_cumprod

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
    run, out, dataset, kind, *settings = sys.argv[1:]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_generator(f"{run}/generator", "cpu")
    points = {}
    for setting in settings:
        temperature, strength = map(float, setting.split(":"))
        guide = loss_guide(pipe, strength) if kind == "loss" else auto_guide(run, strength)
        tag = f"{kind}_T{temperature:g}_{strength:g}"
        save_file({"params": sample(pipe, temperature, guide).contiguous()}, str(out / f"{tag}.safetensors"))
        subprocess.run([sys.executable, "-m", "pdiff", "evaluate", "--dataset", dataset, "--generated", str(out / f"{tag}.safetensors"), "--out", str(out / tag),
                        "--noise-scales", "1", "1.5", "2", "--no-plots", "--overwrite"], check=True, capture_output=True)
        report = Report.load(out / tag)
        row, verdict = report.generated, report.verdict
        points[tag] = {"test_mean": round(row.test.mean, 5), "test_min": round(row.test.min, 5), "nearest_iou": round(row.novelty.iou.mean, 4),
                       "lead": round(verdict.difference, 5), "margin": round(verdict.margin, 5)}
        print(f"{tag:18} test mean {row.test.mean:.4f} min {row.test.min:.4f} IoU {row.novelty.iou.mean:.3f} lead {verdict.difference:+.4f}", flush=True)
    (out / f"{kind}.json").write_text(json.dumps(points, indent=1) + "\n")


if __name__ == "__main__":
    main()
