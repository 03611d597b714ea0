"""fisherscan: Fisher-guided robust tuning (FisherTune, CVPR 2025) of ViT foundation models."""

__version__ = "0.1.0"
