"""The model layer: backbones by name, their checkpoints, the segmenter (backbone + decoder) and its heads.

``registry`` names, ``families`` records, ``checkpoints`` loads, ``backbone`` builds, ``groups`` sorts every
parameter element into Q, K, V, FFN, ... (Eq. 3), ``segmenter`` puts a decoder (``decoders``) on top. This layer
imports nothing from the Fisher layer.
"""

from ..lazy import lazy_attribute

_EXPORTS = {  # name -> the submodule it comes from (imported on first use)
    "Backbone": ".backbone",
    "build_backbone": ".backbone",
    "create_architecture": ".backbone",
    "meta_architecture": ".backbone",
    "patch_tokens": ".backbone",
    "registry_rows": ".backbone",
    "convert_state_dict": ".checkpoints",
    "load_weights": ".checkpoints",
    "read_state_dict": ".checkpoints",
    "resolve_weights": ".checkpoints",
    "FAMILIES": ".families",
    "Family": ".families",
    "ModelEntry": ".families",
    "mae_sincos_table": ".families",
    "head_path_for": ".heads",
    "load_head": ".heads",
    "save_head": ".heads",
    "REGISTRY": ".registry",
    "base_name": ".registry",
    "family_of": ".registry",
    "hub_checkpoint_dir": ".registry",
    "timm_kwargs_of": ".registry",
    "timm_name_of": ".registry",
    "DECODERS": ".segmenter",
    "Segmenter": ".segmenter",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    return lazy_attribute(__name__, _EXPORTS, name)
