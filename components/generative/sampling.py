"""Sample grids as PNG, and loading a trained generative artifact for sampling. No Ray.

>>> sample_grid(Path("runs/.../artifacts/gan-..."), n=64, label=3, out=Path("threes.png"))
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

MODEL_FILE = "model.pt"


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


def load_generator(artifact_dir: str | Path):
    """Rebuilds the sampler of a ``generative.vae`` or ``generative.gan`` artifact.

    Returns:
        (the VAE or the generator, in eval mode on the CPU; the saved bundle: ``kind``,
        hparams, normalization, classes, config, metrics)
    """
    import torch

    from components.generative.models import VAE, Generator

    file = Path(artifact_dir) / MODEL_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found; is it a generative.vae/gan artifact?")
    bundle = torch.load(file, map_location="cpu", weights_only=True)
    cls = VAE if bundle["kind"] == "vae" else Generator
    model = cls.from_hparams(bundle["hparams"])
    model.load_state_dict(bundle["model"])
    model.eval()
    return model, bundle


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


def sample_grid(artifact_dir: Path, n: int, label: int | None, out: Path, seed: int = 0) -> Path:
    """Writes a PNG grid of ``n`` samples of a trained VAE or GAN artifact (``raypipe sample``).

    Args:
        artifact_dir: the artifact directory of a ``generative.vae``/``generative.gan`` stage.
        n: number of samples.
        label: the class to draw (conditional models only); None draws every class in turn.
        out: the PNG file to write.
        seed: seeds the latent noise.

    Returns:
        ``out``.

    Raises:
        ValueError: a label for an unconditional model, or a label out of range.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    model, _bundle = load_generator(artifact_dir)
    return save_grid(generate(model, n, label, seed), out)


def export(out_dir: Path, kind: str, weights, hparams, info, config, metrics) -> Path:
    """Writes ``model.pt``: the sampler's weights, architecture, normalization, classes,
    config and metrics (tensors and plain data only: loadable with ``weights_only``)."""
    from components import training

    path = Path(out_dir) / MODEL_FILE
    training.save_model(path, weights, hparams, info, config, metrics, kind=kind)
    return path


def to_uint8(pixels: Any):
    """Pixels in [0, 1] (tensor) as a uint8 tensor: compact for checkpoints."""
    return (pixels.detach().float().clamp(0, 1) * 255).round().to("cpu").byte()
