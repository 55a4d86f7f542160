"""Generative models: a convolutional VAE (``generative.vae``) and a DCGAN-style GAN
(``generative.gan``), both trained with Ray Train; sample grids and a Frechet distance in the
feature space of the project's own classifier (``vision.train``)."""
