"""The generative networks: plain PyTorch, no Ray.

Every network works on pixels: the VAE on [0, 1] (its decoder returns logits), the GAN on
[-1, 1] (tanh). Both image sides must be divisible by ``2**depth``: each of the ``depth``
stages halves (encoder, discriminator) or doubles (decoder, generator) the resolution.
Conditional variants take integer labels: the encoder and decoder of the VAE and the generator
see a one-hot label; the discriminator is a projection discriminator (Miyato & Koyama, 2018).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def check_image_size(image_size: tuple[int, int], depth: int) -> None:
    """Raises ValueError unless both sides of ``image_size`` are divisible by ``2**depth``."""
    if any(side % 2**depth for side in image_size):
        raise ValueError(
            f"image size {tuple(image_size)} is not divisible by 2**depth = {2**depth}: "
            "lower `depth`"
        )


def _one_hot(labels: torch.Tensor | None, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    if labels is None:
        raise ValueError("a conditional model needs labels")
    return F.one_hot(labels.long(), num_classes).to(like.dtype)


class _Encoder(nn.Module):
    """``depth`` stride-2 convolutions, channels ``width * 2**i``; flat features out."""

    def __init__(self, in_channels: int, width: int, depth: int, spectral: bool = False):
        super().__init__()
        wrap = nn.utils.parametrizations.spectral_norm if spectral else (lambda m: m)
        layers: list[nn.Module] = [wrap(nn.Conv2d(in_channels, width, 3, padding=1))]
        layers.append(nn.LeakyReLU(0.2))
        channels = width
        for i in range(depth):
            out = width * 2**i
            layers += [wrap(nn.Conv2d(channels, out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            channels = out
        self.net = nn.Sequential(*layers)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)


class _Decoder(nn.Module):
    """A linear map to a ``2**depth``-times smaller feature map, then ``depth`` transposed
    convolutions that double the resolution, then a 3x3 convolution to the image channels."""

    def __init__(
        self, in_features: int, out_channels: int, image_size, width: int, depth: int, bn: bool
    ):
        super().__init__()
        self.start = (
            width * 2 ** (depth - 1),
            image_size[0] // 2**depth,
            image_size[1] // 2**depth,
        )
        self.fc = nn.Linear(in_features, math.prod(self.start))
        layers: list[nn.Module] = [nn.BatchNorm2d(self.start[0]) if bn else nn.Identity()]
        layers.append(nn.ReLU())
        channels = self.start[0]
        for i in reversed(range(depth)):
            out = width * 2 ** max(i - 1, 0)
            layers.append(nn.ConvTranspose2d(channels, out, 4, stride=2, padding=1))
            layers += [nn.BatchNorm2d(out) if bn else nn.Identity(), nn.ReLU()]
            channels = out
        layers.append(nn.Conv2d(channels, out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(h).view(-1, *self.start))


class VAE(nn.Module):
    """A convolutional VAE with a diagonal Gaussian encoder q(z|x) and a standard normal prior.

    Args:
        in_channels: image channels.
        image_size: (H, W).
        latent_dim: size of z.
        width: channels of the first convolution.
        depth: resolution halvings in the encoder (doublings in the decoder).
        num_classes: labels of a conditional VAE (0: unconditional).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int],
        latent_dim: int = 16,
        width: int = 32,
        depth: int = 2,
        num_classes: int = 0,
    ):
        super().__init__()
        check_image_size(image_size, depth)
        self.hparams = {
            "in_channels": in_channels,
            "image_size": list(image_size),
            "latent_dim": latent_dim,
            "width": width,
            "depth": depth,
            "num_classes": num_classes,
        }
        self.latent_dim, self.num_classes = latent_dim, num_classes
        # The label enters the encoder as constant one-hot channels.
        self.encoder = _Encoder(in_channels + num_classes, width, depth)
        flat = self.encoder.channels * math.prod(s // 2**depth for s in image_size)
        self.to_stats = nn.Linear(flat, 2 * latent_dim)
        self.decoder = _Decoder(
            latent_dim + num_classes, in_channels, image_size, width, depth, False
        )

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        """Returns (mu, logvar) of q(z|x)."""
        if self.num_classes:
            onehot = _one_hot(labels, self.num_classes, x)[:, :, None, None]
            x = torch.cat([x, onehot.expand(-1, -1, *x.shape[2:])], 1)
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar.clamp(-12, 8)  # keeps exp(logvar) finite in bf16 and early training

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Returns the decoder's pixel logits (apply a sigmoid for the [0, 1] mean)."""
        if self.num_classes:
            z = torch.cat([z, _one_hot(labels, self.num_classes, z)], 1)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        """Returns (pixel logits of the reconstruction, mu, logvar), with z drawn by the
        reparameterization z = mu + sigma * eps so that gradients reach the encoder."""
        mu, logvar = self.encode(x, labels)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self.decode(z, labels), mu, logvar

    def sample(self, n: int, labels: torch.Tensor | None = None, generator=None) -> torch.Tensor:
        """Draws ``n`` images from the prior: the decoder's mean, pixels in [0, 1]."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator, device=device)
        return torch.sigmoid(self.decode(z, labels).float())

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any]) -> VAE:
        return cls(**{**hparams, "image_size": tuple(hparams["image_size"])})


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) in closed form, summed over latent dimensions (N,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)


def reconstruction_nll(
    logits: torch.Tensor, x: torch.Tensor, likelihood: str, sigma: float = 0.1
) -> torch.Tensor:
    """-log p(x|z) per image (N,), in nats, for pixels ``x`` in [0, 1].

    ``bernoulli``: binary cross-entropy with the decoder's logits (the usual choice for digits;
    grey levels act as soft targets). ``gaussian``: a Gaussian with mean sigmoid(logits) and
    fixed standard deviation ``sigma``, including its normalizing constant.
    """
    logits, x = logits.float(), x.float()
    if likelihood == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    else:
        mean = torch.sigmoid(logits)
        nll = 0.5 * ((x - mean) / sigma) ** 2 + math.log(sigma) + 0.5 * math.log(2 * math.pi)
    return nll.flatten(1).sum(1)


class Generator(nn.Module):
    """DCGAN generator: z (and a one-hot label) -> linear -> ``depth`` x (transposed
    convolution, batch norm, ReLU) -> 3x3 convolution -> tanh, pixels in [-1, 1]."""

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int],
        latent_dim: int = 32,
        width: int = 32,
        depth: int = 2,
        num_classes: int = 0,
    ):
        super().__init__()
        check_image_size(image_size, depth)
        self.hparams = {
            "in_channels": in_channels,
            "image_size": list(image_size),
            "latent_dim": latent_dim,
            "width": width,
            "depth": depth,
            "num_classes": num_classes,
        }
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.net = _Decoder(latent_dim + num_classes, in_channels, image_size, width, depth, True)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            z = torch.cat([z, _one_hot(labels, self.num_classes, z)], 1)
        return torch.tanh(self.net(z))

    def sample(self, n: int, labels: torch.Tensor | None = None, generator=None) -> torch.Tensor:
        """Draws ``n`` images, pixels in [0, 1]."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator, device=device)
        return (self.forward(z, labels).float() + 1) / 2

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any]) -> Generator:
        return cls(**{**hparams, "image_size": tuple(hparams["image_size"])})


class Discriminator(nn.Module):
    """DCGAN discriminator without batch norm (its statistics would mix the real and fake
    halves of a batch); optional spectral norm on every layer; a projection term
    ``<embed(y), h>`` for conditional models. Returns one raw score (logit) per image."""

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int],
        width: int = 32,
        depth: int = 2,
        num_classes: int = 0,
        spectral_norm: bool = False,
    ):
        super().__init__()
        check_image_size(image_size, depth)
        self.hparams = {
            "in_channels": in_channels,
            "image_size": list(image_size),
            "width": width,
            "depth": depth,
            "num_classes": num_classes,
            "spectral_norm": spectral_norm,
        }
        wrap = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        self.features = _Encoder(in_channels, width, depth, spectral=spectral_norm)
        flat = self.features.channels * math.prod(s // 2**depth for s in image_size)
        self.head = wrap(nn.Linear(flat, 1))
        self.embed = wrap(nn.Embedding(num_classes, flat)) if num_classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(x)
        score = self.head(h).squeeze(1)
        if self.embed is not None:
            if labels is None:
                raise ValueError("a conditional model needs labels")
            score = score + (self.embed(labels.long()) * h).sum(1)
        return score

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any]) -> Discriminator:
        return cls(**{**hparams, "image_size": tuple(hparams["image_size"])})


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, kind: str) -> torch.Tensor:
    """D's loss from its scores on real and (detached) fake images."""
    real, fake = real.float(), fake.float()
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    # -log D(real) - log(1 - D(fake)) with D = sigmoid(score), written stably.
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def generator_loss(fake: torch.Tensor, kind: str) -> torch.Tensor:
    """G's loss from D's scores on fake images: non-saturating -log D(G(z)), or hinge's -D."""
    fake = fake.float()
    if kind == "hinge":
        return -fake.mean()
    return F.softplus(-fake).mean()
