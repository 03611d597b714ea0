"""Segmentation decoders on a ViT backbone's patch tokens: ``linear``, ``multilevel`` and ``mask2former``."""
