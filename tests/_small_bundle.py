"""One small export shared by test_export.py and test_backends.py (exporting costs ~10 s a graph).

``small_export`` runs once per pytest session and is cached on the pytest config object.
"""

from __future__ import annotations


from dheads.engine.backends.base import BatchProfile
from dheads.engine.checkpoint import checkpoint_from_model, save_checkpoint
from dheads.engine.config import SMALL
from dheads.engine.model import DiffusedHeadsUNet, random_unet

PROFILE = BatchProfile(1, 2, 3)


def small_model(seed: int = 0) -> DiffusedHeadsUNet:
    """SMALL UNet with every parameter N(0, 0.02): the zero-init output convs would make parity trivial."""
    return random_unet(SMALL, seed=seed)


def small_export(config, tmp_path_factory):
    """``(checkpoint path, ExportResult)`` of ``small_model(0)`` exported at fp16 (both ONNX), batch 1..3."""
    cached = getattr(config, "_dheads_small_export", None)
    if cached is None:
        from dheads.export.pipeline import run_export

        root = tmp_path_factory.mktemp("small_export")
        ckpt = save_checkpoint(root / "small.pt", checkpoint_from_model(small_model()))
        result = run_export(ckpt, root / "small_bundle", precision="fp16", profile=PROFILE, seed=0, tensorrt=False)
        cached = config._dheads_small_export = (ckpt, result)
    return cached
