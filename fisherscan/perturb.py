"""``fisherscan.perturb``: Eq. 6's public names, kept where they were (their home: ``fisherscan.fisher.perturb``)."""

from .fisher.perturb import (
                             EPS,
                             TokenShift,
                             block_input,
                             channel_statistics,
                             draw_eps,
                             perturb_statistics,
                             shift_statistics,
                             statistic_spread,
)

__all__ = ["EPS", "TokenShift", "block_input", "channel_statistics", "draw_eps", "perturb_statistics",
           "shift_statistics", "statistic_spread"]
