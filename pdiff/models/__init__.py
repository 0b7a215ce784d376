"""The generator's networks: the parameter autoencoder, the latent UNet1D, the target network."""

from typing import Any, Mapping

from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' loader looks it up here)

from ..params import ParameterLayout

from .autoencoder import AutoencoderOutput, ParameterAutoencoder, ParameterCodec
from .target import TargetNetwork
from .token_autoencoder import TokenAutoencoder
from .unet import UNet1DModel, build_unet

# `generator.autoencoder.type` -> class; a saved autoencoder's config.json names its class.
AUTOENCODERS = {"conv": ParameterAutoencoder, "tokens": TokenAutoencoder}
AUTOENCODER_CLASSES = {cls.__name__: cls for cls in AUTOENCODERS.values()}


def autoencoder_from_config(config: Mapping[str, Any], layout: ParameterLayout) -> ParameterCodec:
    """A new, unnormalised autoencoder for `layout` from `generator.autoencoder` (its `type` picks the class)."""
    kwargs = {k: v for k, v in config.items() if v is not None}
    kind = kwargs.pop("type", "conv")
    if kind == "tokens":  # tokens follow the layout's tensors
        kwargs["tensor_sizes"] = [slot.numel for slot in layout.slots]
    return AUTOENCODERS[kind](param_dim=layout.dim, **kwargs)

__all__ = ["AUTOENCODERS", "AUTOENCODER_CLASSES", "AutoencoderOutput", "autoencoder_from_config", "ParameterAutoencoder", "ParameterCodec", "TargetNetwork", "TokenAutoencoder", "UNet1DModel", "build_unet"]
