"""The official SemiMeta code (github.com/Sakura03/SemiMeta) restated in PyTorch, for timing.

`models` holds the official networks, `steps` the official training steps, and `timing` runs
and times one case of them; `experiments/benchmark_official_pytorch.py` is the command line.
"""
