"""Sample grids as PNG, and a trained VAE or generator for sampling (the loader its bundle
names). No Ray.

>>> model = load_model(Path("runs/.../artifacts/generative.gan/..."))   # components.bundle
>>> model.sample_grid(64, label=3, out=Path("threes.png"))
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def grid_image(pixels: np.ndarray, scale: int = 4, pad: int = 1):
    """Tiles (N, C, H, W) pixels in [0, 1] into a near-square PIL image, each tile enlarged
    ``scale`` times (nearest neighbour) and separated by ``pad`` pixels of grey."""
    from PIL import Image

    pixels = np.clip(np.asarray(pixels, np.float32), 0, 1)
    n, c, h, w = pixels.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 0.5, np.float32)
    for i, image in enumerate(pixels):
        r, k = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        canvas[top : top + h, left : left + w] = image.transpose(1, 2, 0)
    canvas = np.repeat(np.repeat(canvas, scale, 0), scale, 1)
    data = (canvas * 255).round().astype(np.uint8)
    return Image.fromarray(data[..., 0] if c == 1 else data, mode="L" if c == 1 else "RGB")


def save_grid(pixels: np.ndarray, out: Path, scale: int = 4) -> Path:
    """Writes a PNG grid of (N, C, H, W) pixels in [0, 1]; returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid_image(pixels, scale).save(out, format="PNG")
    return out


def load_vae(bundle) -> Sampler:
    """The loader a ``model/vae`` bundle names."""
    from components.generative.models import VAE

    return Sampler(VAE, bundle)


def load_gan(bundle) -> Sampler:
    """The loader a ``model/gan`` bundle names (the generator; the discriminator is not kept)."""
    from components.generative.models import Generator

    return Sampler(Generator, bundle)


class Sampler:
    """A trained VAE or generator for sampling (CPU, eval mode): what ``load_model`` gives.

    Attributes:
        module: the network (``VAE`` or ``Generator``).
        bundle: its bundle (normalization in ``bundle.meta``, classes in ``bundle.labels``).
    """

    def __init__(self, network, bundle):
        self.bundle = bundle
        weights = bundle.weights()["model"]  # read first: a bad file fails before anything
        self.module = network.from_hparams(bundle.hparams)
        self.module.load_state_dict(weights)
        self.module.eval()

    def sample(self, n: int, label: int | None = None, seed: int = 0) -> np.ndarray:
        """``n`` samples, pixels in [0, 1] (N, C, H, W); see :func:`generate`."""
        return generate(self.module, n, label, seed)

    def sample_grid(self, n: int, label: int | None, out: Path, seed: int = 0) -> Path:
        """Writes a PNG grid of ``n`` samples (``raypipe sample``); returns ``out``.

        Raises:
            ValueError: a label for an unconditional model, a label out of range, or n < 1.
        """
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        return save_grid(self.sample(n, label, seed), out)


def generate(model, n: int, label: int | None = None, seed: int = 0) -> np.ndarray:
    """``n`` samples (pixels in [0, 1], (N, C, H, W)) of a generative model in eval mode.

    A conditional model gets ``label`` for every sample, or labels 0, 1, 2, ... in turn when
    ``label`` is None; an unconditional model rejects a label.
    """
    import torch

    classes = model.num_classes
    if label is not None and not classes:
        raise ValueError("this model is unconditional: it takes no --label")
    if label is not None and not 0 <= label < classes:
        raise ValueError(f"label {label} is outside [0, {classes})")
    labels = None
    if classes:
        labels = torch.full((n,), label) if label is not None else torch.arange(n) % classes
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return model.sample(n, labels, generator=generator).numpy()


def to_uint8(pixels: Any):
    """Pixels in [0, 1] (tensor) as a uint8 tensor: compact for checkpoints."""
    return (pixels.detach().float().clamp(0, 1) * 255).round().to("cpu").byte()
