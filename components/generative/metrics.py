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
    """Penultimate features (``model.features``) of normalized (N, C, H, W) images."""
    import torch

    x = torch.as_tensor(np.array(images, dtype=np.float32))
    model.eval()
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
        classifier: a ``vision.train`` classifier (eval mode).
        info: the ``DatasetInfo`` of the data (for normalization).
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
    import torch

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
        per_class = []
        for label in range(info.num_classes):
            labels = torch.full((per_label,), label, dtype=torch.long)
            images = torch.as_tensor(normalize(conditional_sampler(labels), info))
            with torch.no_grad():
                predicted = classifier(images).argmax(1)
            per_class.append(float((predicted == label).float().mean()))
        metrics["eval/cond_accuracy"] = float(np.mean(per_class))
        metrics["eval/cond_accuracy_per_label"] = per_class
    return metrics
