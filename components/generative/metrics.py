"""Sample quality without downloaded weights: a Frechet distance in the feature space of the
project's own classifier (``vision.train``), and that classifier's accuracy on class-
conditional samples. Plain numpy/PyTorch, no Ray.

The distance is FID's formula on different features: ``eval/fd_classifier`` is comparable
between models scored with the same classifier artifact and sample count, not with published
FID numbers (which use Inception-v3 features of 299x299 images).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2):
    ``|mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2))``.

    The trace of the matrix square root is computed from the eigenvalues of
    ``sqrt(cov1) cov2 sqrt(cov1)`` (symmetric PSD, same eigenvalues as ``cov1 cov2``), which
    stays real and stable where ``scipy.linalg.sqrtm`` of the non-symmetric product can return
    complex noise for near-singular covariances.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    root1 = _psd_sqrt(cov1)
    eig = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    trace_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt)


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features."""
    features = np.asarray(features, np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance_of(features1: np.ndarray, features2: np.ndarray) -> float:
    """The Frechet distance between the Gaussians fitted to two (N, D) feature sets."""
    return frechet_distance(*feature_stats(features1), *feature_stats(features2))


def classifier_features(model, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Penultimate features (``model.features``) of normalized (N, C, H, W) images, from a
    loaded ``model/classifier`` (``components.bundle.load_model``)."""
    import torch

    x = torch.as_tensor(np.array(images, dtype=np.float32))
    with torch.no_grad():
        parts = [model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(parts).double().numpy()


def noise_images(n: int, info, seed: int = 0) -> np.ndarray:
    """Gaussian noise with the data's per-channel mean and spread: N(0, 1) in the normalized
    space of a ``standard`` normalization (the ceiling of a Frechet distance)."""
    from components.data.dataset import denormalize, normalize

    rng = np.random.default_rng(seed)
    c, h, w = info.image_shape
    # Drawn in normalized space, clipped to the valid pixel range like any generated image.
    pixels = np.clip(denormalize(rng.standard_normal((n, c, h, w)).astype(np.float32), info), 0, 1)
    return normalize(pixels, info)


def score_samples(
    classifier,
    info,
    real_test: np.ndarray,
    real_reference: np.ndarray,
    samplers: dict[str, Any],
    conditional_sampler=None,
    per_label: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """Frechet distances to the real test images and, for conditional models, the
    classifier's accuracy on samples of each label.

    Args:
        classifier: a loaded ``model/classifier``.
        info: the ``DatasetInfo`` or ``ImageSpec`` of the data (for normalization).
        real_test: normalized real test images: the reference distribution.
        real_reference: other normalized real images (the floor, ``fd_classifier_real``).
        samplers: ``name -> fn(n) -> pixels in [0, 1]``; each gives ``eval/fd_classifier``
            with ``_name`` appended unless the name is empty.
        conditional_sampler: ``fn(labels) -> pixels`` of a conditional model, or None.
        per_label: samples generated per label for the conditional accuracy.
        seed: seeds the noise images.

    Returns:
        ``eval/fd_classifier[_name]``, ``eval/fd_classifier_real``,
        ``eval/fd_classifier_noise``, and ``eval/cond_accuracy`` (mean over labels) with
        ``eval/cond_accuracy_per_label`` for conditional models.
    """

    from components.data.dataset import normalize

    n = len(real_test)
    test_features = classifier_features(classifier, real_test)
    test_stats = feature_stats(test_features)

    def distance(images: np.ndarray) -> float:
        return frechet_distance(
            *test_stats, *feature_stats(classifier_features(classifier, images))
        )

    metrics: dict[str, Any] = {
        "eval/fd_classifier_real": distance(real_reference[:n]),
        "eval/fd_classifier_noise": distance(noise_images(n, info, seed)),
        "eval/fd_samples": n,
    }
    for name, sampler in samplers.items():
        key = "eval/fd_classifier" + (f"_{name}" if name else "")
        metrics[key] = distance(normalize(sampler(n), info))
    if conditional_sampler is not None:
        per_class = conditional_accuracy(classifier, info, conditional_sampler, per_label)
        metrics["eval/cond_accuracy"] = float(np.mean(per_class))
        metrics["eval/cond_accuracy_per_label"] = per_class
    return metrics


def conditional_accuracy(classifier, info, conditional_sampler, per_label: int) -> list[float]:
    """The classifier's accuracy on ``per_label`` samples of each label, label by label.

    Args:
        classifier: a loaded ``model/classifier``.
        info: the ``DatasetInfo`` or ``ImageSpec`` of the data (classes, normalization).
        conditional_sampler: ``fn(labels) -> pixels in [0, 1]`` of a conditional model.
        per_label: samples per label.
    """
    import torch

    from components.data.dataset import normalize

    per_class = []
    for label in range(info.num_classes):
        labels = torch.full((per_label,), label, dtype=torch.long)
        images = torch.as_tensor(normalize(conditional_sampler(labels), info))
        predicted = classifier.predict(images)
        per_class.append(float((predicted == label).float().mean()))
    return per_class


class SampleDistance:
    """The per-epoch ``val/fd_classifier`` of a training loop: the Frechet distance between a
    model's samples and a fixed set of real images, in a classifier's feature space.

    Built once per worker; the real images' statistics are computed once, and every call draws
    the same latent points (a fixed seed), so successive epochs are compared on equal terms.
    A GAN has no likelihood to validate on; this is what a search over GANs ranks by.

    Args:
        classifier: the bundle of a ``model/classifier`` (in memory: workers may be anywhere).
        real: real images, pixels in [0, 1], (N, C, H, W), on the worker's device.
        shift: the data's per-channel normalization shift, shaped (1, C, 1, 1).
        divisor: the data's per-channel normalization divisor, shaped (1, C, 1, 1).
        seed: seeds the latent points of the samples.
    """

    def __init__(self, classifier, real, shift, divisor, seed: int = 0):
        self.dev, self.shift, self.divisor, self.seed = real.device, shift, divisor, seed
        self.classifier = classifier.load()
        self.classifier.module.to(self.dev)
        self.n = len(real)
        self.real_stats = feature_stats(self._features(real))

    def _features(self, pixels) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = (pixels.float() - self.shift) / self.divisor
            parts = [self.classifier.features(x[i : i + 512]) for i in range(0, len(x), 512)]
        return torch.cat(parts).double().cpu().numpy()

    def __call__(self, model) -> float:
        """The distance of ``model``'s samples (a VAE or generator, put in eval mode)."""
        import torch

        model.eval()
        draw = torch.Generator(device=self.dev).manual_seed(self.seed)
        labels = None
        if model.num_classes:
            labels = torch.arange(self.n, device=self.dev) % model.num_classes
        with torch.no_grad():
            pixels = model.sample(self.n, labels, generator=draw)
        return frechet_distance(*self.real_stats, *feature_stats(self._features(pixels)))
