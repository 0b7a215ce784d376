"""The generator's networks: the parameter autoencoder, the latent UNet1D, the target network."""

from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' loader looks it up here)

from .autoencoder import AutoencoderOutput, ParameterAutoencoder, ParameterCodec
from .target import TargetNetwork
from .token_autoencoder import TokenAutoencoder
from .unet import UNet1DModel, build_unet

# `generator.autoencoder.type` -> class; a saved autoencoder's config.json names its class.
AUTOENCODERS = {"conv": ParameterAutoencoder, "tokens": TokenAutoencoder}

__all__ = ["AUTOENCODERS", "AutoencoderOutput", "ParameterAutoencoder", "ParameterCodec", "TargetNetwork", "TokenAutoencoder", "UNet1DModel", "build_unet"]
