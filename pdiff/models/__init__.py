"""The generator's networks: the parameter autoencoder, the latent UNet1D, the target network."""

from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' loader looks it up here)

from .autoencoder import AutoencoderOutput, ParameterAutoencoder
from .target import TargetNetwork
from .unet import UNet1DModel, build_unet

__all__ = ["AutoencoderOutput", "ParameterAutoencoder", "TargetNetwork", "UNet1DModel", "build_unet"]
