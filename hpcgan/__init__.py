"""hpcgan: distributed GAN training on medical images for HPC clusters."""

__version__ = "0.1.0"
