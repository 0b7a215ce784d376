"""PDiffPipeline: save -> load -> the same networks, batched sampling, bf16, networks, and bad generator folders."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline
from safetensors.torch import load_file, save_file

import pdiff.pipelines  # noqa: F401  (registers PDiffPipeline with diffusers)
from generator_helpers import sample, tiny_generator, write_malicious_pickle
from pdiff import ParameterDataset, PDiffPipeline, Task
from pdiff.evaluation import evaluate_network, evaluate_vectors
from pdiff.params import LayoutMismatchError
from pdiff.pipelines import InvalidGeneratorError
from pdiff.tasks.networks import build_network


@pytest.fixture(scope="module")
def dataset(digits_params) -> ParameterDataset:
    return ParameterDataset.from_pretrained(digits_params)


@pytest.fixture(scope="module")
def pipe(dataset) -> PDiffPipeline:
    return tiny_generator(dataset)


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("generator") / "gen"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture
def copy_of(saved, tmp_path):
    """A fresh copy of the saved generator to damage."""

    def make() -> Path:
        return Path(shutil.copytree(saved, tmp_path / "gen"))

    return make


# -- save / load / sample ------------------------------------------------------------------------


def test_saved_folder_holds_only_safetensors_json_and_card(saved):
    files = sorted(str(p.relative_to(saved)) for p in saved.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "autoencoder/config.json", "autoencoder/diffusion_pytorch_model.safetensors",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "target/config.json", "target/diffusion_pytorch_model.safetensors",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    ]
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "PDiffPipeline"
    target = json.loads((saved / "target" / "config.json").read_text())
    assert target["layout"]["dim"] == 778 and target["task"]["name"] == "digits"


def test_save_load_gives_bit_identical_networks_for_the_same_seed(pipe, saved):
    loaded = PDiffPipeline.from_pretrained(saved)
    assert isinstance(loaded, PDiffPipeline) and isinstance(loaded.scheduler, DDIMScheduler)
    for seed in (0, 1):
        expected, got = sample(pipe, seed), sample(loaded, seed)
        assert got.dtype == torch.float32 and got.shape == (4, 778)
        assert torch.equal(expected, got), f"seed {seed}: max diff {(expected - got).abs().max()}"
    assert torch.equal(sample(loaded, 0), sample(loaded, 0))  # and repeatable
    assert not torch.allclose(sample(loaded, 0), sample(loaded, 1))  # different seeds, different networks
    assert loaded.layout == pipe.layout
    for name in ("autoencoder", "unet", "target"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_plain_diffusion_pipeline_from_pretrained_loads_it(pipe, saved):
    loaded = DiffusionPipeline.from_pretrained(saved)
    assert type(loaded) is PDiffPipeline
    assert torch.equal(sample(loaded, 3), sample(pipe, 3))


def test_one_batched_chain_for_all_networks(dataset):
    for sampler, steps in (("ddim", 5), ("ddpm", 7)):
        pipe = tiny_generator(dataset, sampler=sampler)
        batches: list[int] = []
        handle = pipe.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
        try:
            params = pipe(num_models=13, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).params
        finally:
            handle.remove()
        assert params.shape == (13, dataset.dim)
        assert batches == [13] * steps, sampler  # one UNet call per step, every network in it
        assert len({tuple(p.tolist()) for p in params}) == 13  # 13 different networks


def test_default_steps_and_argument_errors(dataset, pipe):
    ddpm = tiny_generator(dataset, sampler="ddpm")
    ddpm.scheduler = DDPMScheduler.from_config(ddpm.scheduler.config, num_train_timesteps=20)
    calls: list[int] = []
    handle = ddpm.unet.register_forward_hook(lambda *a: calls.append(1))
    ddpm(num_models=2, generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert len(calls) == 20  # DDPM defaults to every training timestep
    for bad in (0, 2.5, "4", True):
        with pytest.raises(ValueError, match="num_models must be a positive integer"):
            pipe(num_models=bad)
    for name in ("", None, 3):  # not the current folder, nor a Hub repo called "None"
        with pytest.raises(ValueError, match="give a generator folder or a Hub repo id"):
            PDiffPipeline.from_pretrained(name)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe(num_models=2, latents=torch.zeros(3, *pipe.autoencoder.latent_shape))
    # Given latents replace the seeded noise: the same latents give the same networks.
    latents = torch.randn(2, *pipe.autoencoder.latent_shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(pipe(num_models=2, num_inference_steps=3, latents=latents).params, pipe(num_models=2, num_inference_steps=3, latents=latents.clone()).params)


def test_ddim_eta_adds_fresh_noise_per_step_and_stays_seeded(dataset, pipe):
    latents = torch.randn(4, *pipe.autoencoder.latent_shape, generator=torch.Generator().manual_seed(5))

    def run(eta: float, seed: int) -> torch.Tensor:
        return pipe(num_models=4, num_inference_steps=5, latents=latents.clone(), eta=eta, generator=torch.Generator().manual_seed(seed)).params

    assert torch.equal(run(0.0, 1), run(0.0, 2))  # deterministic DDIM: the seed only draws the starting noise
    assert torch.equal(run(1.0, 1), run(1.0, 1)) and not torch.equal(run(1.0, 1), run(1.0, 2))  # fresh noise per step, from the seed
    assert not torch.equal(run(1.0, 1), run(0.0, 1))
    with pytest.raises(ValueError, match="eta=1.5"):
        pipe(num_models=1, eta=1.5)
    with pytest.raises(ValueError, match="DDIM sampler"):
        tiny_generator(dataset, sampler="ddpm")(num_models=1, num_inference_steps=2, eta=0.5)


def test_ddim_defaults_to_the_steps_saved_with_the_generator(dataset, tmp_path):
    gen = tiny_generator(dataset)
    gen.register_to_config(default_num_inference_steps=6)
    gen.save_pretrained(tmp_path / "gen")
    loaded = PDiffPipeline.from_pretrained(tmp_path / "gen")
    assert loaded.config.default_num_inference_steps == 6
    calls: list[int] = []
    handle = loaded.unet.register_forward_hook(lambda *a: calls.append(1))
    loaded(num_models=2, generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert len(calls) == 6


def test_bf16_sampling_returns_float32_networks(pipe, saved):
    reference = sample(pipe, 0)
    for loaded in (PDiffPipeline.from_pretrained(saved).to(torch.bfloat16), PDiffPipeline.from_pretrained(saved, torch_dtype=torch.bfloat16)):
        loaded.set_progress_bar_config(disable=True)
        # Only the denoiser is cast: the normalisation (mean checkpoint) in bf16 would be off by ~1/4 of the
        # spread between checkpoints, and the networks users get stay float32.
        assert loaded.unet.dtype == torch.bfloat16
        assert loaded.autoencoder.dtype == torch.float32 and loaded.target.dtype == torch.float32
        params = sample(loaded, 0)
        assert params.dtype == torch.float32 and torch.isfinite(params).all()
        spread = (pipe.autoencoder.scale * 4).expand_as(params)
        assert ((params - reference).abs() < spread).all()  # the same noise, a slightly different path
        assert all(v.dtype in (torch.float32, torch.int64) for v in loaded.state_dicts(params)[0].values())


def test_networks_match_batched_evaluation(pipe, dataset):
    params = sample(pipe, 0, num_models=3)
    task = Task(pipe.target.config.task)
    split = task.data.split("val")
    batched = evaluate_vectors(pipe.target.net, pipe.layout, params, split, task.data.prepare)
    nets = pipe.networks(params)
    assert len(nets) == 3 and all(not net.training for net in nets)
    for i, net in enumerate(nets):
        accuracy, loss = evaluate_network(net, split, task.data.prepare)
        assert accuracy == batched.accuracy[i].item()
        assert loss == pytest.approx(batched.loss[i].item(), rel=1e-4)
        assert torch.equal(pipe.layout.flatten(net), params[i])
    assert batched.accuracy.min() > 0.5  # decoded near the checkpoints: working networks even untrained
    # State dicts load strictly into a freshly built network of the task.
    for i, state in enumerate(pipe.state_dicts(params)):
        fresh = build_network(pipe.target.config.network, pipe.target.config.in_channels, pipe.target.config.num_classes)
        fresh.load_state_dict(state, strict=True)
        assert torch.equal(pipe.layout.flatten(fresh), params[i])
        base = dataset.base_state
        frozen = [k for k in base if k not in pipe.layout.names]
        assert frozen and all(torch.equal(state[k], base[k]) for k in frozen)


# -- bad input -------------------------------------------------------------------------------------


def test_missing_component_or_index(copy_of):
    folder = copy_of()
    shutil.rmtree(folder / "unet")
    with pytest.raises(FileNotFoundError, match=r"\['unet'\]"):
        PDiffPipeline.from_pretrained(folder)
    (folder / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="model_index.json is missing"):
        PDiffPipeline.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="no generator folder"):
        PDiffPipeline.from_pretrained(folder / "nothing-here")


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_layout_that_does_not_match_the_network(copy_of):
    folder = copy_of()
    _edit_json(folder / "target" / "config.json", lambda c: c["layout"]["tensors"][0].update(name="bn9.weight"))
    with pytest.raises(LayoutMismatchError, match=r"target/config.json: .*bn9.weight"):
        PDiffPipeline.from_pretrained(folder)


def test_layout_that_does_not_match_the_autoencoder(saved, tmp_path):
    folder = Path(shutil.copytree(saved, tmp_path / "gen"))

    def drop_fc_bias(c):  # a layout the network accepts, but 10 numbers short of what the autoencoder makes
        c["layout"]["tensors"] = [t for t in c["layout"]["tensors"] if t["name"] != "fc.bias"]
        c["layout"]["dim"] = 768

    _edit_json(folder / "target" / "config.json", drop_fc_bias)
    with pytest.raises(LayoutMismatchError, match="autoencoder generates 778 numbers but the target layout has 768"):
        PDiffPipeline.from_pretrained(folder)


def _rewrite_header(file: Path, edit) -> None:
    """Change a safetensors header (valid JSON, same length), leaving the data alone."""
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    file.write_bytes(raw[:8] + new + b" " * (n - len(new)) + raw[8 + n :])


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "shape", "offsets"])
def test_damaged_safetensors_file_is_named(saved, tmp_path, damage):
    folder = Path(shutil.copytree(saved, tmp_path / "gen"))
    file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    raw = file.read_bytes()
    if damage == "truncated":
        file.write_bytes(raw[: len(raw) - 100])
    elif damage == "empty":
        file.write_bytes(b"")
    elif damage == "garbage":
        file.write_bytes(b"this is not a safetensors file at all" * 10)
    elif damage == "shape":  # a tensor claims another shape of the same size: rejected when loading into the UNet
        def swap(h):
            name = next(k for k, v in h.items() if k != "__metadata__" and len(v["shape"]) == 3 and v["shape"][0] != v["shape"][1])
            a, b, c = h[name]["shape"]
            h[name]["shape"] = [b, a, c]
        _rewrite_header(file, swap)
    elif damage == "offsets":  # a tensor's byte range points outside the data
        def shift(h):
            name = next(k for k in h if k != "__metadata__")
            h[name]["data_offsets"] = [h[name]["data_offsets"][0], h[name]["data_offsets"][1] + 4]
        _rewrite_header(file, shift)
    with pytest.raises(InvalidGeneratorError, match=r"unet"):
        try:
            PDiffPipeline.from_pretrained(folder)
        except InvalidGeneratorError as err:
            assert "unet" in str(err) and ("diffusion_pytorch_model.safetensors" in str(err) or "size mismatch" in str(err))
            raise


def test_weights_missing_a_tensor_are_refused(saved, tmp_path):
    """diffusers would only warn and initialise the tensor randomly: a generator of garbage networks."""
    folder = Path(shutil.copytree(saved, tmp_path / "gen"))
    file = folder / "autoencoder" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    state.pop("decoder.0.weight")
    state["extra.tensor"] = torch.zeros(3)
    save_file(state, file)
    with pytest.raises(InvalidGeneratorError, match=r"autoencoder.*missing tensors \['decoder.0.weight'\].*unexpected tensors \['extra.tensor'\]"):
        PDiffPipeline.from_pretrained(folder)


def test_pickle_files_are_never_loaded(pipe, saved, tmp_path):
    folder = Path(shutil.copytree(saved, tmp_path / "gen"))
    marker = tmp_path / "PICKLE_WAS_EXECUTED"
    for name in ("unet/diffusion_pytorch_model.bin", "autoencoder/diffusion_pytorch_model.bin", "optimizer.pt", "target/model.pkl"):
        write_malicious_pickle(folder / name, marker)
    with pytest.warns(UserWarning, match="ignoring pickle files"):
        loaded = PDiffPipeline.from_pretrained(folder)
    assert torch.equal(sample(loaded, 0), sample(pipe, 0))  # the safetensors weights were used
    # diffusers' own loader prefers the safetensors too.
    assert torch.equal(sample(DiffusionPipeline.from_pretrained(folder), 0), sample(pipe, 0))
    # A component with only pickled weights: a clear error, still nothing unpickled.
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"unet has no safetensors weights.*never loaded"):
        PDiffPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="safetensors only"):
        PDiffPipeline.from_pretrained(folder, use_safetensors=False)
    assert not marker.exists()


@pytest.mark.parametrize("component", ["unet", "autoencoder", "target"])
def test_diffusers_own_loader_never_unpickles(saved, tmp_path, component):
    """`DiffusionPipeline.from_pretrained` falls back to `.bin` weights unless told otherwise; pdiff's
    components refuse whichever loader calls them, a legitimate torch-saved state dict included."""
    assert json.loads((saved / "model_index.json").read_text())["unet"] == ["pdiff.models.unet", "UNet1DModel"]
    folder = Path(shutil.copytree(saved, tmp_path / "gen"))
    weights = folder / component / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / component / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(OSError, match="safetensors"):
        DiffusionPipeline.from_pretrained(folder)
    marker = tmp_path / "PICKLE_WAS_EXECUTED"
    write_malicious_pickle(folder / component / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(OSError):
        DiffusionPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="safetensors only"):
        DiffusionPipeline.from_pretrained(saved, use_safetensors=False)
    assert not marker.exists()


def test_model_index_may_not_name_other_code(saved, tmp_path):
    folder = Path(shutil.copytree(saved, tmp_path / "gen"))
    _edit_json(folder / "model_index.json", lambda c: c.update(autoencoder=["subprocess", "Popen"]))
    with pytest.raises(InvalidGeneratorError, match="component 'autoencoder' is"):
        PDiffPipeline.from_pretrained(folder)
    for kwargs in ({"custom_pipeline": "pipeline"}, {"trust_remote_code": True}):
        with pytest.raises(ValueError, match="never runs code"):
            PDiffPipeline.from_pretrained(saved, **kwargs)


def test_components_must_fit_together(dataset, pipe):
    other = tiny_generator(dataset)
    from pdiff import build_unet

    with pytest.raises(InvalidGeneratorError, match="latent has 4"):
        PDiffPipeline(autoencoder=pipe.autoencoder, unet=build_unet(8, 200, block_out_channels=[8, 16]), scheduler=pipe.scheduler, target=other.target)
