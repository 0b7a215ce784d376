"""pdiff/models: the parameter autoencoder, the UNet builder and the target network, without training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pdiff.models import ParameterAutoencoder, TargetNetwork, build_unet
from pdiff.params import ParameterLayout


class TwoTensors(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 7)  # weight 35 + bias 7
        self.b = nn.Linear(7, 3)


def _checkpoints(k: int = 16) -> tuple[torch.Tensor, ParameterLayout]:
    layout = ParameterLayout.from_module(TwoTensors(), ["a.weight", "a.bias", "b.weight"])
    g = torch.Generator().manual_seed(0)
    # tensors on very different scales, as real checkpoints are: normalisation must even them out
    center = torch.cat([torch.full((35,), 3.0), torch.full((7,), -0.5), torch.full((21,), 0.01)])
    spread = torch.cat([torch.full((35,), 0.1), torch.full((7,), 0.01), torch.full((21,), 1e-4)])
    return center + spread * torch.randn(k, layout.dim, generator=g), layout


@pytest.mark.parametrize("channels", [[8], [8, 16], [8, 16, 32]])
def test_autoencoder_shapes(channels):
    vectors, layout = _checkpoints()
    ae = ParameterAutoencoder(param_dim=layout.dim, channels=channels, latent_channels=3, norm_groups=4).eval()
    latents = ae.encode(ae.normalize(vectors), add_noise=False)
    assert latents.shape == (len(vectors), *ae.latent_shape)
    assert ae.latent_shape[0] == 3 and ae.padded_dim % 2 ** len(channels) == 0 and ae.padded_dim >= layout.dim
    assert ae.decode(latents).shape == vectors.shape
    out = ae(ae.normalize(vectors))
    assert out.reconstruction.shape == vectors.shape and out.latent.shape == latents.shape


@pytest.mark.parametrize("normalization", ["residual", "tensor"])
def test_normalization_gives_unit_spread_per_tensor(normalization):
    vectors, layout = _checkpoints()
    ae = ParameterAutoencoder(param_dim=layout.dim, channels=[8], normalization=normalization)
    ae.fit_normalization(vectors, layout)
    x = ae.normalize(vectors).double()
    for slot in layout.slots:
        part = x[:, slot.offset : slot.end]
        if normalization == "residual":  # centred on the mean checkpoint, per position
            assert part.mean(0).abs().max() < 1e-5
        else:  # centred on the tensor's own mean
            assert abs(float(part.mean())) < 1e-4
        assert float(part.std()) == pytest.approx(1.0, rel=0.05)
    assert torch.allclose(ae.denormalize(ae.normalize(vectors)), vectors, atol=1e-5)


def test_unknown_normalization_is_refused():
    with pytest.raises(ValueError, match="normalization"):
        ParameterAutoencoder(param_dim=10, normalization="batch")


def test_autoencoder_save_load_round_trip(tmp_path):
    vectors, layout = _checkpoints()
    ae = ParameterAutoencoder(param_dim=layout.dim, channels=[8, 16], latent_channels=4, normalization="tensor", scaling_factor=0.5)
    ae.fit_normalization(vectors, layout)
    ae.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = ParameterAutoencoder.from_pretrained(tmp_path, use_safetensors=True)
    assert loaded.config.normalization == "tensor" and loaded.config.scaling_factor == 0.5
    for (name, a), b in zip(ae.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    ae.eval(), loaded.eval()
    assert torch.equal(ae.params_to_latents(vectors), loaded.params_to_latents(vectors))


def test_unet_denoises_the_latent_shape_and_checks_its_rules():
    unet = build_unet(4, 16, block_out_channels=[8, 16, 32], norm_num_groups=8)
    x = torch.randn(3, 4, 16)
    assert unet(x, torch.tensor([1, 10, 999])).sample.shape == x.shape
    with pytest.raises(ValueError, match="divisible"):
        build_unet(4, 6, block_out_channels=[8, 16, 32])
    with pytest.raises(ValueError, match="multiples of norm_num_groups"):
        build_unet(4, 16, block_out_channels=[8, 12], norm_num_groups=8)


def test_target_network_turns_vectors_into_networks(tmp_path):
    network = {"name": "small_cnn", "widths": [4, 8, 8]}
    layout = ParameterLayout.from_module(_small_cnn(), ["fc.weight", "fc.bias"])
    target = TargetNetwork(network=network, in_channels=1, num_classes=10, layout=layout.to_dict())
    vectors = torch.randn(2, target.layout.dim)
    nets = target.networks(vectors)
    assert len(nets) == 2 and not nets[0].training
    assert torch.equal(nets[1].fc.weight.flatten(), vectors[1, :80]) and torch.equal(nets[1].fc.bias, vectors[1, 80:])
    assert torch.equal(nets[0].conv1.weight, target.net.conv1.weight)  # the rest is the base network
    states = target.state_dicts(vectors)
    assert torch.equal(states[0]["fc.bias"], vectors[0, 80:]) and set(states[0]) == set(target.net.state_dict())
    target.save_pretrained(tmp_path, safe_serialization=True)
    loaded = TargetNetwork.from_pretrained(tmp_path, use_safetensors=True)
    assert loaded.layout == target.layout and torch.equal(loaded.net.conv1.weight, target.net.conv1.weight)


def _small_cnn():
    from pdiff.tasks import build_network

    return build_network({"name": "small_cnn", "widths": [4, 8, 8]}, in_channels=1, num_classes=10)


# -- the token autoencoder (whole networks) ----------------------------------------------------------


def test_tokens_never_cross_a_tensor_boundary():
    from pdiff.models.token_autoencoder import chunk_index

    sizes = [35, 7, 21, 64, 65]
    index = chunk_index(sizes, chunk_size=16)
    ends = torch.tensor(sizes).cumsum(0)
    for row in index:
        positions = row[row < sum(sizes)]
        tensors = torch.bucketize(positions, ends, right=True)
        assert len(positions) > 0 and (tensors == tensors[0]).all()
    # every position appears exactly once, in order
    assert torch.equal(index.flatten()[index.flatten() < sum(sizes)], torch.arange(sum(sizes)))
    assert len(index) == sum((s + 15) // 16 for s in sizes)


def test_token_autoencoder_round_trip_shapes_and_learning():
    from pdiff.models import TokenAutoencoder

    vectors, layout = _checkpoints(32)
    ae = TokenAutoencoder(param_dim=layout.dim, tensor_sizes=[s.numel for s in layout.slots], chunk_size=8, hidden=32, latent_channels=8)
    ae.fit_normalization(vectors, layout)
    latents = ae.params_to_latents(vectors)
    assert latents.shape == (32, *ae.latent_shape) and ae.latent_shape[1] % 8 == 0
    assert latents[:, :, ae.num_tokens :].abs().sum() == 0  # padding tokens are zero
    assert ae.latents_to_params(latents).shape == vectors.shape
    optimizer = torch.optim.Adam(ae.parameters(), lr=3e-3)
    x = ae.normalize(vectors)
    first = None
    for _ in range(150):
        loss = (ae(x).reconstruction - x).pow(2).mean()
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.3 * first  # it learns to reconstruct (8 numbers per token kept: no compression to hide behind)


def test_token_autoencoder_save_load_and_layout_checks(tmp_path):
    from pdiff.models import TokenAutoencoder

    vectors, layout = _checkpoints()
    ae = TokenAutoencoder(param_dim=layout.dim, tensor_sizes=[s.numel for s in layout.slots], chunk_size=8, hidden=16).eval()
    ae.fit_normalization(vectors, layout)
    ae.save_pretrained(tmp_path / "ae")
    loaded = TokenAutoencoder.from_pretrained(tmp_path / "ae").eval()
    assert torch.equal(ae.params_to_latents(vectors), loaded.params_to_latents(vectors))
    assert sorted(p.name for p in (tmp_path / "ae").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    with pytest.raises(ValueError, match="for another layout"):
        TokenAutoencoder(param_dim=layout.dim, tensor_sizes=[35, 7])
    with pytest.raises(ValueError, match="chunk_size"):
        TokenAutoencoder(param_dim=layout.dim, tensor_sizes=[35, 7, 21], chunk_size=0)


def test_token_activation_memory_grows_with_d_over_chunk_and_conv_with_d_times_width():
    from pdiff.models import TokenAutoencoder

    sizes = [300_000]
    tokens = TokenAutoencoder(param_dim=300_000, tensor_sizes=sizes, chunk_size=64, hidden=128)
    conv = ParameterAutoencoder(param_dim=300_000, channels=[64, 128, 256, 256])
    assert tokens.activation_bytes(50) < 8 * 2**30 < conv.activation_bytes(50)


@pytest.mark.parametrize("generator", ["default", "large", "paper", "tokens"])
def test_every_shipped_generator_builds_and_denoises_its_latent(generator):
    """`generator=<name>` composes, and its autoencoder and denoiser fit each other on a real layout."""
    from pdiff.config import load_config, to_dict
    from pdiff.models import autoencoder_from_config

    cfg = load_config([f"generator={generator}"])
    vectors, layout = _checkpoints()
    ae = autoencoder_from_config(to_dict(cfg.generator.autoencoder), layout).eval()
    ae.fit_normalization(vectors, layout)
    latents = ae.encode(ae.normalize(vectors[:2]), add_noise=False)
    unet = build_unet(*ae.latent_shape, **to_dict(cfg.generator.unet))
    assert unet(latents, torch.tensor([0, 999])).sample.shape == latents.shape
    assert ae.latents_to_params(latents).shape == (2, layout.dim)
