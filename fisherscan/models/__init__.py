"""The model layer: backbones by name, their checkpoints, the segmenter (backbone + decoder) and its heads.

``registry`` names, ``families`` records, ``checkpoints`` loads, ``backbone`` builds, ``groups`` sorts every
parameter element into Q, K, V, FFN, ... (Eq. 3), ``segmenter`` puts a decoder (``decoders``) on top. This layer
imports nothing from the Fisher layer.
"""

from .backbone import Backbone, build_backbone, create_architecture, meta_architecture, patch_tokens, registry_rows
from .checkpoints import convert_state_dict, load_weights, read_state_dict, resolve_weights
from .families import FAMILIES, Family, ModelEntry, mae_sincos_table
from .heads import head_path_for, load_head, save_head
from .registry import REGISTRY, base_name, family_of, hub_checkpoint_dir, timm_kwargs_of, timm_name_of
from .segmenter import DECODERS, Segmenter

__all__ = ["Backbone", "build_backbone", "create_architecture", "meta_architecture", "patch_tokens",
           "registry_rows", "convert_state_dict", "load_weights", "read_state_dict", "resolve_weights", "FAMILIES",
           "Family", "ModelEntry", "mae_sincos_table", "head_path_for", "load_head", "save_head", "REGISTRY",
           "base_name", "family_of", "hub_checkpoint_dir", "timm_kwargs_of", "timm_name_of", "DECODERS", "Segmenter"]
