"""VLA-Adapter + CRaFT: Prismatic VLA fine-tuning with a constrained representation-retention objective."""

__version__ = "0.1.0"
