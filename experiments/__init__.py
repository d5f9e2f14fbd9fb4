"""Experiments, benchmarks and the mutation check, each run as a module from the repository root.

For example `python -m experiments.benchmark_step --small` or
`python -m experiments.digits_results --out=results/digits`; each script's
docstring gives its command lines. Installed with the project, so they import
`configs` and one another as packages.
"""
