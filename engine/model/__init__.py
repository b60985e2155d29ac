"""The Diffused Heads UNet and config inference."""

from .infer import ConfigInferenceError, infer_config
from .unet import DiffusedHeadsUNet, random_unet

__all__ = ["DiffusedHeadsUNet", "random_unet", "infer_config", "ConfigInferenceError"]
