"""The tradeoff study (the assignment's Problem 5): time, accuracy, scale and energy of every
backend x precision on real layers, written as results.json/csv, six plots and report.md.

    from qconv.study import load_layers, run_study
    run_study(load_layers(["layer_dir", "in.bin:kernel.bin"]), "out/", quick=True)

From the command line: ``qconv study [LAYERS...] --out DIR`` (see qconv.study.cli).
"""

from .runner import SCHEMA_NAME, SCHEMA_VERSION, Layer, Study, load_layers, run_study
from .schema import load_schema, validate

__all__ = ["Layer", "SCHEMA_NAME", "SCHEMA_VERSION", "Study", "load_layers", "load_schema", "run_study",
           "validate"]
