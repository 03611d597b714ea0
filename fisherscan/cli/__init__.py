"""The ``fisherscan`` command line: each command parses options, calls one library function, prints.

One module per command family; each registers its commands on ``app`` (``fisherscan.cli.app``).
"""

from . import bench, evaluate, models, plot, score, tune  # noqa: F401  (register their commands)
from .app import app

__all__ = ["app"]
