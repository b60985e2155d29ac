"""The Diffused Heads UNet and config inference."""

from .infer import ConfigInferenceError, infer_config
from .unet import DiffusedHeadsUNet

__all__ = ["DiffusedHeadsUNet", "infer_config", "ConfigInferenceError"]
