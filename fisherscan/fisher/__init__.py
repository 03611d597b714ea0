"""The Fisher layer: per-image gradients, the diagonal and variational Fisher, Eq. 6's shift, and DR-FIM.

``loss`` (Eq. 9's per-image loss and sampled labels), ``rules`` + ``engine`` (per-image gradients by per-layer
rules at about the cost of a training step), ``vmap`` (the reference path), ``diagonal`` (Eq. 8/9),
``variational`` (Eq. 10-14) + ``variational_segmentation`` (its likelihood for a segmentation model),
``perturb`` (Eq. 6), ``drfim`` (Eq. 5/7 and 15 and their defaults).
"""

from ..models.logits import upsample_logits
from .diagonal import ENGINES, FisherAccumulator, diagonal_fisher, make_engine, squared_gradient_sum
from .drfim import default_delta_eps, delta_fisher, dr_fim, dr_fim_terms, fisher_scale, shift_weight
from .engine import HookEngine
from .loss import LABEL_MODES, image_loss, labelled_loss, sample_labels, trainable_parameters
from .perturb import TokenShift, perturb_statistics
from .variational import VariationalResult, fit_precision, precision_to_fisher
from .variational_segmentation import variational_fisher, variational_fit
from .vmap import vmap_squared_gradient_sum

__all__ = ["upsample_logits", "ENGINES", "FisherAccumulator", "diagonal_fisher", "make_engine",
           "squared_gradient_sum", "delta_fisher", "default_delta_eps", "dr_fim", "dr_fim_terms", "fisher_scale",
           "shift_weight", "HookEngine", "LABEL_MODES", "image_loss", "labelled_loss", "sample_labels",
           "trainable_parameters", "TokenShift", "perturb_statistics", "VariationalResult", "fit_precision",
           "precision_to_fisher", "variational_fisher", "variational_fit", "vmap_squared_gradient_sum"]
