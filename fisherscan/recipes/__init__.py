"""The recipes: ``score`` (Algorithm 1 steps 1-2) and ``tune`` (step 3) written out plainly, their configuration
dataclasses, presets, checkpoints and scale-out. Only the command line and the benchmarks import from here."""
