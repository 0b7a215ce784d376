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
