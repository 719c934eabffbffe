"""The study's files: results.json (schema in results.schema.json), results.csv (network.csv with
--network), the plots and report.md, written in that order so that a valid result exists whatever
fails later."""

from __future__ import annotations

import contextlib
import csv
import os
from pathlib import Path
from typing import Any, Iterator

from .. import jsonout
from ..errors import InputError
from ..backends.base import PHASES
from . import plots as figures
from . import report, summary


def study_files() -> set[str]:
    """Every file name a study writes into its folder (what --force may remove)."""
    names = set(figures.PLOTS) | set(getattr(figures, "_DRAW", {})) | {"network_layers"}
    return {"results.json", "results.json.tmp", "results.csv", "network.csv", "report.md",
            *(f"{n}.png" for n in names)}


def prepare_out(out: Path, force: bool = False) -> None:
    """Create the output folder, or take an existing one: empty; or holding a previous study's
    results (results.json and only files a study writes), replaced with ``force`` (its files are
    removed first, so nothing stale is left) and refused without. A folder holding anything else
    is refused: the study never overwrites or mixes with files it did not write."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output folder {out}: exists and is not a folder")
    if out.is_dir():
        entries = sorted(out.iterdir())
        known = study_files()
        foreign = [e.name for e in entries if e.name not in known or not (e.is_file() or e.is_symlink())]
        if entries and ("results.json" not in {e.name for e in entries} or foreign):
            names = ", ".join((foreign or [e.name for e in entries])[:3])
            raise InputError(f"output folder {out} holds files the study did not write ({names}"
                             f"{', ...' if len(foreign or entries) > 3 else ''}): choose an empty or new --out")
        if entries and not force:
            raise InputError(f"output folder {out} holds a previous study's results: pass --force to replace "
                             f"them, or choose another --out")
        for e in entries:
            try:
                e.unlink()
            except OSError as err:
                raise InputError(f"output folder {out}: cannot remove the previous {e.name} "
                                 f"({err.strerror or err})") from None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"output folder {out}: cannot create it ({e.strerror or e})") from None
    if not os.access(out, os.W_OK):
        raise InputError(f"output folder {out}: not writable")


@contextlib.contextmanager
def _naming(path: Path, tmp: Path | None = None) -> Iterator[None]:
    """An OSError while writing ``path`` names ``path`` (not a temporary file, not nothing: a full
    disk's ENOSPC carries no file name); ``tmp`` is removed."""
    try:
        yield
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise OSError(e.errno, f"{path.name} could not be written ({e.strerror or e})", str(path)) from None


def write_json(res: dict[str, Any], path: Path) -> None:
    """Write through a temporary file, replaced in one step: a reader sees the old or the new file."""
    tmp = path.with_suffix(".json.tmp")
    with _naming(path, tmp):
        tmp.write_text(jsonout.dumps(res, indent=1) + "\n")
        os.replace(tmp, path)


CSV_FIELDS = ["layer", "backend", "precision", "scale_strategy", "rounding", "s_x", "s_w", "per_channel", "repeat",
              *(f"{ph}_median_s" for ph in PHASES), "convolve_min_s", "convolve_max_s",
              "total_median_s", "call_median_s", "gops", "peak_gops", "peak_share", "speedup_vs_baseline",
              "speedup_call_vs_baseline", "speedup_vs_best_fp32", "nrmse", "effective_bits", "wrapped_outputs",
              "wrapped_fraction", "overflow_possible", "bit_exact", "energy_estimate_j",
              "energy_dynamic_j", "energy_measured", "energy_meter", "error"]


def write_csv(res: dict[str, Any], path: Path) -> None:
    with _naming(path), open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        wr.writeheader()
        for m in res["measurements"]:
            row = {k: m.get(k) for k in ("layer", "backend", "precision", "scale_strategy", "rounding", "repeat",
                                           "gops", "peak_gops", "peak_share", "speedup_vs_baseline",
                                           "speedup_call_vs_baseline", "speedup_vs_best_fp32", "nrmse",
                                           "effective_bits", "wrapped_outputs", "wrapped_fraction",
                                           "overflow_possible", "bit_exact", "error")}
            sc = m.get("scale") or {}
            # per-channel kernel scales: s_w is their geometric mean, flagged by per_channel
            row.update(s_x=sc.get("s_x"), s_w=sc.get("s_w"), per_channel=sc.get("per_channel"))
            if m.get("precision") == "fp32":
                row["rounding"] = None  # FP32 rounds no scaled value
            if "phases_s" in m:
                for ph in PHASES:
                    row[f"{ph}_median_s"] = m["phases_s"][ph]["median"]
                row["convolve_min_s"] = m["phases_s"]["convolve"]["min"]
                row["convolve_max_s"] = m["phases_s"]["convolve"]["max"]
                row["total_median_s"] = m["total_s"]["median"]
                row["call_median_s"] = m["call_s"]["median"]
                row["energy_estimate_j"] = m["energy_estimate_j"]["total_j"]
                em = m.get("energy_measured")
                row["energy_dynamic_j"] = em.get("dynamic_joules_per_call") if em else None
                row["energy_measured"] = em.get("measured") if em else None
                row["energy_meter"] = em["meter"] if em else None
            wr.writerow({k: ("" if v is None else v) for k, v in row.items()})


NETWORK_CSV_FIELDS = ["network", "backend", "precision", "scale_strategy", "single_s", "images", "labelled", "top1",
                      "top5", "fp32_top1", "lost", "agreement", "logits_nrmse", "layer_nrmse_median",
                      "layer_nrmse_max", "worst_layer", "layers_over_99", "layers_over_95", "threshold_99",
                      "threshold_95"]


def write_network_csv(res: dict[str, Any], path: Path) -> None:
    """network.csv: one row per network option (results.csv keeps one row per layer measurement)."""
    net = res["network"]
    th = (net.get("threshold") or {}).get("agreement") or {}
    with _naming(path), open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=NETWORK_CSV_FIELDS)
        wr.writeheader()
        for o in net["options"]:
            lo = o.get("layers_over") or {}
            row = {"network": net["name"], "backend": net.get("backend"), "precision": o["precision"],
                   "scale_strategy": o["strategy"], "single_s": o.get("single_s"), "images": net["evaluation_images"],
                   "labelled": net["labelled_images"], "top1": o["top1"], "top5": o["top5"],
                   "fp32_top1": (net.get("fp32") or {}).get("top1"), "lost": o["lost"], "agreement": o["agreement"],
                   "logits_nrmse": o["logits_nrmse"], "layer_nrmse_median": o["layer_nrmse_median"],
                   "layer_nrmse_max": o["layer_nrmse_max"], "worst_layer": o["worst_layer"],
                   "layers_over_99": lo.get("0.99"), "layers_over_95": lo.get("0.95"),
                   "threshold_99": th.get("0.99"), "threshold_95": th.get("0.95")}
            wr.writerow({k: ("" if v is None else v) for k, v in row.items()})


def finish(res: dict[str, Any], out: Path, plots: bool = True) -> None:
    """Derive the summary; write results.json and results.csv first, then the plots, results.json
    again with the plot list, and report.md. A partial run writes whatever its data allows; a
    complete run re-raises a plot or report failure after writing the rest."""
    summary.derive(res)
    write_json(res, out / "results.json")
    write_csv(res, out / "results.csv")
    if res.get("network"):
        write_network_csv(res, out / "network.csv")
    failure: Exception | None = None
    interrupted: KeyboardInterrupt | None = None
    if plots:
        try:
            res["plots"] = figures.draw_all(res, out)
        except Exception as e:
            res["plots_error"] = f"{e.__class__.__name__}: {e}"
            failure = e
        except KeyboardInterrupt as e:  # the data are written: say so, and give the report without figures
            res["status"], res["partial_reason"] = "partial", "interrupted (KeyboardInterrupt) while the plots were drawn"
            res["plots"], interrupted = [], e
        write_json(res, out / "results.json")
    try:
        text = report.render(res)
        with _naming(out / "report.md"):
            (out / "report.md").write_text(text)
    except Exception as e:
        failure = failure or e
    if interrupted is not None:
        raise interrupted
    if failure is not None and res["status"] == "complete":
        raise failure
