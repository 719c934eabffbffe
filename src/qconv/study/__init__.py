"""The tradeoff study (the assignment's Problem 5): time, accuracy, scale and energy of every
backend variant x precision on real layers, written as results.json/csv, plots and report.md.

    from qconv.study import load_layers, run_study
    run_study(load_layers(["layer_dir", "in.bin:kernel.bin"]), "out/", quick=True)

From the command line: ``qconv study [LAYERS...] --out DIR`` (see qconv.study.cli).

Modules, each importing only those before it: config (layers, options, constants), accuracy
(sweeps, strategies, the single-S table), energy, machine, references (library reference
points), network (the --network section: a pretrained network through qconv.nets), summary
(derive, pareto, compare, the acceptable NRMSE), figures/plots_scale/plots_network/plots,
appendix/report_network/report, artifacts (the writers), grid (the Study that runs it all).
"""

from .config import SCHEMA_NAME, SCHEMA_VERSION, Layer, load_layers
from .grid import Study, run_study
from .schema import load_schema, validate

__all__ = ["Layer", "SCHEMA_NAME", "SCHEMA_VERSION", "Study", "load_layers", "load_schema", "run_study",
           "validate"]
