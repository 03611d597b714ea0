"""``fisherscan.select``: the selection's public names, kept where they were (their home:
``fisherscan.scores.select``)."""

from .scores.select import (
                            SCORE_STRATEGIES,
                            STRATEGIES,
                            candidate_elements,
                            mask_from_order,
                            select_mask,
                            selected_count,
                            selected_fraction,
                            selection_order,
                            write_mask,
)

__all__ = ["SCORE_STRATEGIES", "STRATEGIES", "candidate_elements", "mask_from_order", "select_mask", "selected_count",
           "selected_fraction", "selection_order", "write_mask"]
