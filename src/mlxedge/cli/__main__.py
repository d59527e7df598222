"""`python -m mlxedge.cli ARGS`: the same program as the `mlxedge` console script."""

from . import main

main(prog_name="mlxedge")
