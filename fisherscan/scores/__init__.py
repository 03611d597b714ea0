"""The scores layer: the scores file, the selection it drives (Eq. 16), its tables, comparisons and figures.

``file`` (save/load), ``select`` (strategies, Eq. 16, masks), ``summary`` (group and block x group tables, exact
top-k), ``compare`` (``fisherscan inspect``: tables and agreement between files), ``plot`` (Fig. 6 heatmaps).
"""

from ..io import METADATA_KEY, atomic_target, remove_stale_temporaries
from .file import KINDS, SCHEMA_VERSION, load_scores, save_scores

__all__ = ["METADATA_KEY", "atomic_target", "remove_stale_temporaries", "KINDS", "SCHEMA_VERSION", "load_scores",
           "save_scores"]
