"""The Fisher layer: per-image gradients, the diagonal and variational Fisher, Eq. 6's shift, and DR-FIM.

``loss`` (Eq. 9's per-image loss and sampled labels), ``rules`` + ``engine`` (per-image gradients by per-layer
rules at about the cost of a training step), ``vmap`` (the reference path), ``diagonal`` (Eq. 8/9),
``variational`` (Eq. 10-14) + ``variational_segmentation`` (its likelihood for a segmentation model),
``perturb`` (Eq. 6), ``drfim`` (Eq. 5/7 and 15 and their defaults).
"""

from ..lazy import lazy_attribute

_EXPORTS = {  # name -> the submodule it comes from (imported on first use)
    "upsample_logits": "..models.logits",
    "ENGINES": ".diagonal",
    "FisherAccumulator": ".diagonal",
    "diagonal_fisher": ".diagonal",
    "make_engine": ".diagonal",
    "squared_gradient_sum": ".diagonal",
    "default_delta_eps": ".drfim",
    "delta_fisher": ".drfim",
    "dr_fim": ".drfim",
    "dr_fim_terms": ".drfim",
    "fisher_scale": ".drfim",
    "shift_weight": ".drfim",
    "HookEngine": ".engine",
    "LABEL_MODES": ".loss",
    "image_loss": ".loss",
    "labelled_loss": ".loss",
    "sample_labels": ".loss",
    "trainable_parameters": ".loss",
    "TokenShift": ".perturb",
    "perturb_statistics": ".perturb",
    "VariationalResult": ".variational",
    "fit_precision": ".variational",
    "precision_to_fisher": ".variational",
    "variational_fisher": ".variational_segmentation",
    "variational_fit": ".variational_segmentation",
    "vmap_squared_gradient_sum": ".vmap",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    return lazy_attribute(__name__, _EXPORTS, name)
