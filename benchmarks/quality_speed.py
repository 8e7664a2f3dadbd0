"""Speed of ``featkd.quality.layer_quality`` against its floor and a naive implementation.

For every generalized layer of an untrained ``resnet34`` (width 0.25; or a
trained teacher, ``--teacher RUN_DIR``) on 5,000 class-balanced Fashion-MNIST
training images (synthetic images when the files are missing, said so in the
results) it times

* ours:  ``layer_quality`` (variant "paper", library defaults: float32 products
  accumulated in float64; ``--dtype float64`` for float64 throughout);
* floor: the float32 products it cannot avoid, on the same data in the same
  process: the n_A x n_A x D Gram plus the per-class Grams (subset B = subset A
  here); with ``--dtype float64`` the same products in float64 as well;
* naive: the same formula computed the way the authors' code does: a separate
  cosine matrix, the distance matrix row by row, full SVDs of the n x D
  matrices, in the same precision as ours (in float64 checked to agree with
  ours to 1e-4; in float32 its cosines lose digits to cancellation, so its
  difference from ours is only recorded).

It reports per layer and in total ours / float32 floor (goal <= 1.5) and
naive / ours (goal >= 5), the peak memory of each (growth of the process's
peak resident set over its resident set before the call), the end-to-end time
of ``featkd.quality.measure`` for all layers, and (unless ``--no-compare``)
the largest relative difference of S, I, E and Q between ours and a float64
computation on the same features (the float32 default must stay within 1e-4).

    python benchmarks/quality_speed.py                       # the full run
    python benchmarks/quality_speed.py --naive-layers 16,17  # naive timed on a subset
    python benchmarks/quality_speed.py --teacher benchmarks/teachers/resnet34   # a trained teacher
    python benchmarks/quality_speed.py --quick --out /tmp/q.json   # seconds, a smoke test
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import re
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from featkd.data import class_balanced_subset, get_datasets
from featkd.layers import extract, generalized_layers
from featkd.models import create_model
from featkd.quality import (
    DEFAULT_DTYPE,
    layer_quality,
    measure,
    pad_spectra,
    quality_parts,
    spectrum_entropy,
)

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float64": torch.float64, "float32": torch.float32}
PARTS = ("S", "I", "E", "Q")
TOLERANCE = 1e-4  # spec: float32 products must agree with float64 to this, relative


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 images per class, synthetic data")
    parser.add_argument("--data", default="fashion_mnist", choices=["fashion_mnist", "synthetic"])
    parser.add_argument("--per-class", type=int, default=500, help="images per class (10 classes)")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--teacher", help="a train-teacher run directory (model.pt, config.yaml) instead "
                        "of the untrained resnet34")
    parser.add_argument("--dtype", default=str(DEFAULT_DTYPE).replace("torch.", ""), choices=sorted(DTYPES),
                        help="product precision of ours and the naive version (the floor is float32, "
                        "and float64 too when this is float64)")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the float64 computation that checks ours against it")
    parser.add_argument("--naive-layers", default="all", help="'all', 'none' or GL indices, e.g. 16,17")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of ours and the floor, alternating; the least time counts")
    parser.add_argument("--skip-measure", action="store_true", help="do not time measure()")
    parser.add_argument("--out", default=str(RESULTS / "quality_speed.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.per_class, args.data, args.repeats = 20, "synthetic", 1
    return args


# ------------------------------------------------------------------ memory and time


def _status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux clear_refs 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    """Hand freed heap memory back to the OS so the next peak is measured from a true baseline."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def timed(fn: Callable[[], object]) -> tuple[float, float | None, object, float]:
    """(wall seconds, peak memory growth in MB or None, result, CPU seconds of this process)."""
    _release_free_heap()
    resettable = _reset_peak()
    before = _status_mb("VmRSS") if resettable else None
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = round(_status_mb("VmHWM") - before, 1) if resettable else None
    return seconds, peak, result, cpu


def best_of(repeats: int, **fns: Callable[[], object]) -> dict:
    """Run the named functions in turn ``repeats`` times. Per name: the least wall and CPU
    times (the least disturbed runs on a shared machine), every time, the largest peak and
    the last result."""
    out = {name: {"times": [], "cpu_times": [], "peak_mb": None} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds, peak, result, cpu = timed(fn)
            entry = out[name]
            entry["times"].append(round(seconds, 3))
            entry["cpu_times"].append(round(cpu, 3))
            if peak is not None:
                entry["peak_mb"] = max(peak, entry["peak_mb"] or 0.0)
            entry["result"] = result
    for entry in out.values():
        entry["seconds"], entry["cpu_seconds"] = min(entry["times"]), min(entry["cpu_times"])
    return out


def machine_info() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(),
        "peak_memory_method": "VmHWM - VmRSS after clear_refs reset" if _reset_peak()
        else "unavailable",
    }


# ------------------------------------------------------------------ the three versions


def floor_products(x: Tensor, labels: Tensor) -> None:
    """The unavoidable work: X X^T and X_c X_c^T for every class (x already in the product dtype)."""
    x @ x.T
    for c in labels.unique():
        xc = x[labels == c]
        xc @ xc.T


def naive_quality(x: Tensor, labels: Tensor, num_train: int, dtype: torch.dtype) -> dict:
    """The paper-variant formula computed as the released code does (slow on purpose)."""
    x = x.to(dtype)
    n = len(x)
    norms = torch.linalg.norm(x, dim=1)
    units = x / norms[:, None]
    cos = (units @ units.T).abs()
    dist = torch.empty(n, n, dtype=dtype)
    for i in range(n):  # the distance matrix row by row
        dist[i] = torch.linalg.norm(x - x[i], dim=1)
    classes = labels.unique()
    num_classes = len(classes)
    intra_avg, intra_min, nu, min_inter = [], [], [], []
    inter = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    for a, c in enumerate(classes):
        inside = labels == c
        block = cos[inside][:, inside]
        upper = torch.triu_indices(len(block), len(block), 1)
        intra_avg.append(block.mean())
        intra_min.append(block[upper[0], upper[1]].min())
        nu.append(norms[inside].mean())
        min_inter.append(dist[inside][:, ~inside].min())
        for b, c2 in enumerate(classes):
            if a != b:
                inter[a, b] = cos[inside][:, labels == c2].mean()
    spectrum = torch.linalg.svd(x, full_matrices=False).S ** 2
    spectrum = spectrum / spectrum.sum()
    rows = []
    for c in classes:
        xc = x[labels == c]
        s2 = torch.linalg.svd(xc - xc.mean(0), full_matrices=False).S.double() ** 2
        rows.append(s2 / s2.sum())
    width = int(torch.bincount(labels).max())
    sample = {
        "intra_avg": torch.stack(intra_avg).double(),
        "intra_min": torch.stack(intra_min).double(),
        "inter_avg": inter,
        "nu": torch.stack(nu).double(),
        "min_inter": torch.stack(min_inter).double(),
        "G": len(spectrum),
        "n": n,
        "D": x.shape[1],
    }
    return quality_parts(sample, spectrum_entropy(pad_spectra(rows, width)), num_train=num_train)


def check_agreement(ours: dict, naive: dict, layer: int) -> None:
    for key in ("S", "I", "E", "Q"):
        if not math.isclose(ours[key], naive[key], rel_tol=1e-4, abs_tol=1e-9):
            raise AssertionError(f"layer {layer}: {key} ours {ours[key]} != naive {naive[key]}")


# ------------------------------------------------------------------ data and features


def load_data(name: str, per_class: int):
    """(training split, note); synthetic images when Fashion-MNIST is missing."""
    if name == "fashion_mnist":
        try:
            train, _ = get_datasets("fashion_mnist")
            return train, "fashion_mnist (real, 28x28 padded to 32x32)"
        except FileNotFoundError as err:
            note = f"synthetic (Fashion-MNIST not found: {str(err).splitlines()[0]})"
            print(note, file=sys.stderr)
    else:
        note = "synthetic (asked for)"
    train, _ = get_datasets("synthetic", num_classes=10, samples_per_class=per_class,
                            in_channels=1, image_size=32)
    return train, note


@torch.no_grad()
def all_features(model, dataset, indices: Tensor, batch_size: int = 250) -> list[Tensor]:
    """Flattened float32 features (n, D) of every GL, one forward pass per batch."""
    layers = list(range(len(generalized_layers(model))))
    feats: list[list[Tensor]] = [[] for _ in layers]
    for start in range(0, len(indices), batch_size):
        x = dataset.batch(indices[start : start + batch_size])[0]
        for slot, f in enumerate(extract(model, x, layers)):
            feats[slot].append(f.flatten(1).float())
    out = []
    while feats:  # concatenate layer by layer, freeing the batch pieces as we go
        out.append(torch.cat(feats.pop(0)))
    return out


# ------------------------------------------------------------------ the run


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _fmt(value: float | None, digits: int) -> str:
    """A ratio for the table; "–" when undefined (a clock measured 0 s)."""
    return "–" if value is None else f"{value:.{digits}f}"


def load_model(args: argparse.Namespace, train) -> tuple[torch.nn.Module, str]:
    """(model in eval mode, its description): the untrained resnet34, or the teacher of ``--teacher``."""
    channels, size, _ = train.image_shape
    if args.teacher is None:
        torch.manual_seed(0)
        model = create_model("resnet34", train.num_classes, in_channels=channels, image_size=size,
                             width=args.width)
        return model.eval(), f"resnet34 width {args.width}, untrained (seed 0)"
    from featkd.checkpoint import load_model_weights
    from featkd.config import TrainConfig

    config = TrainConfig.from_yaml(Path(args.teacher) / "config.yaml")
    model = create_model(config.model, train.num_classes, in_channels=channels, image_size=size,
                         width=config.width)
    load_model_weights(model, args.teacher)
    return model.eval(), f"{config.model} width {config.width:g}, trained ({args.teacher})"


def largest_difference(ours: dict, reference: dict) -> float:
    """The largest relative difference of S, I, E and Q between two results."""
    return max(abs(ours[k] - reference[k]) / max(abs(reference[k]), 1e-12) for k in PARTS)


def run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    dtype = DTYPES[args.dtype]
    compare = dtype != torch.float64 and not args.no_compare
    train, data_note = load_data(args.data, args.per_class)
    model, model_note = load_model(args, train)
    names = generalized_layers(model)
    naive_layers = (list(range(len(names))) if args.naive_layers == "all" else [] if
                    args.naive_layers == "none" else [int(v) for v in args.naive_layers.split(",")])
    subset = class_balanced_subset(train.labels, args.per_class, seed=0)
    labels = train.labels[subset]
    num_train = len(train)
    print(f"data: {data_note}; {len(subset)} images, {len(names)} layers", file=sys.stderr)
    extract_s, _, feats, _ = timed(lambda: all_features(model, train, subset))

    rows = []
    for index, (name, x) in enumerate(zip(names, feats)):
        x64 = x.double() if dtype == torch.float64 else None
        timers = {"ours": lambda: layer_quality(x, labels, num_train=num_train, dtype=dtype),
                  "floor": lambda: floor_products(x, labels)}
        if x64 is not None:
            timers["floor64"] = lambda: floor_products(x64, labels)
        runs = best_of(args.repeats, **timers)
        x64 = None  # free the float64 copy before the next layer
        ours, ours_s, floor_s = runs["ours"]["result"], runs["ours"]["seconds"], runs["floor"]["seconds"]
        row = {
            "index": index, "name": name, "D": x.shape[1],
            "ours_s": ours_s, "floor_s": floor_s, "ours_over_floor": _ratio(ours_s, floor_s),
            "ours_cpu_s": runs["ours"]["cpu_seconds"], "floor_cpu_s": runs["floor"]["cpu_seconds"],
            "ours_over_floor_cpu": _ratio(runs["ours"]["cpu_seconds"], runs["floor"]["cpu_seconds"]),
            "ours_times": runs["ours"]["times"], "floor_times": runs["floor"]["times"],
            "ours_peak_mb": runs["ours"]["peak_mb"], "floor_peak_mb": runs["floor"]["peak_mb"],
            "S": ours["S"], "I": ours["I"], "E": ours["E"], "Q": ours["Q"],
        }
        if "floor64" in runs:
            row.update(floor64_s=runs["floor64"]["seconds"], floor64_cpu_s=runs["floor64"]["cpu_seconds"],
                       ours_over_floor64=_ratio(ours_s, runs["floor64"]["seconds"]))
        if compare:
            f64_s, _, exact, f64_cpu = timed(lambda: layer_quality(x, labels, num_train=num_train,
                                                                   dtype=torch.float64))
            row.update(float64_s=f64_s, float64_cpu_s=f64_cpu,
                       max_rel_diff_vs_float64=largest_difference(ours, exact))
        if index in naive_layers:
            naive_s, naive_mb, naive, naive_cpu = timed(lambda: naive_quality(x, labels, num_train, dtype))
            if dtype == torch.float64:
                check_agreement(ours, naive, index)
            row.update(naive_s=naive_s, naive_cpu_s=naive_cpu, naive_peak_mb=naive_mb,
                       naive_max_rel_diff=largest_difference(naive, ours),
                       naive_over_ours=_ratio(naive_s, ours_s),
                       naive_over_ours_cpu=_ratio(naive_cpu, row["ours_cpu_s"]))
        rows.append(row)
        print(f"layer {index:2d} D={x.shape[1]:6d} ours {ours_s:7.2f}s floor {floor_s:7.2f}s"
              + (f" float64 {row['float64_s']:7.2f}s (max rel diff {row['max_rel_diff_vs_float64']:.1e})"
                 if compare else "")
              + (f" naive {row['naive_s']:8.2f}s" if "naive_s" in row else ""), file=sys.stderr)
    del feats

    totals = {key: sum(r[key] for r in rows) for key in ("ours_s", "floor_s", "ours_cpu_s", "floor_cpu_s")}
    totals["ours_over_floor"] = _ratio(totals["ours_s"], totals["floor_s"])
    totals["ours_over_floor_cpu"] = _ratio(totals["ours_cpu_s"], totals["floor_cpu_s"])
    if compare:
        totals["float64_s"] = sum(r["float64_s"] for r in rows)
        totals["float64_cpu_s"] = sum(r["float64_cpu_s"] for r in rows)
        totals["float64_over_ours"] = _ratio(totals["float64_s"], totals["ours_s"])
        totals["max_rel_diff_vs_float64"] = max(r["max_rel_diff_vs_float64"] for r in rows)
        totals["within_tolerance"] = totals["max_rel_diff_vs_float64"] <= TOLERANCE
    if dtype == torch.float64:
        totals["floor64_s"] = sum(r["floor64_s"] for r in rows)
        totals["ours_over_floor64"] = _ratio(totals["ours_s"], totals["floor64_s"])
    timed_rows = [r for r in rows if "naive_s" in r]
    if timed_rows:
        for clock in ("s", "cpu_s"):
            naive_total = sum(r[f"naive_{clock}"] for r in timed_rows)
            ours_same = sum(r[f"ours_{clock}"] for r in timed_rows)
            totals[f"naive_{clock}_on_naive_layers"] = naive_total
            totals[f"ours_{clock}_on_naive_layers"] = ours_same
        totals["naive_over_ours"] = _ratio(totals["naive_s_on_naive_layers"],
                                           totals["ours_s_on_naive_layers"])
        totals["naive_over_ours_cpu"] = _ratio(totals["naive_cpu_s_on_naive_layers"],
                                               totals["ours_cpu_s_on_naive_layers"])
    peaks = {key: max((r[key] for r in rows if r.get(key) is not None), default=None)
             for key in ("ours_peak_mb", "floor_peak_mb", "naive_peak_mb")}

    result = {
        "benchmark": "quality_speed",
        "command": "python benchmarks/quality_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "data": data_note,
        "model": model_note,
        "n_a": len(subset), "num_classes": 10, "num_train": num_train, "variant": "paper",
        "dtype": args.dtype,
        "timing": f"wall clock and process CPU time (all threads); ours and floor: least of "
                  f"{args.repeats} alternating runs; naive and measure: one run",
        "feature_extraction_s": extract_s,
        "naive_layers": naive_layers,
        "naive_note": ("naive timed on every layer" if len(naive_layers) == len(names) else
                       f"naive timed on layers {naive_layers} only (the row-by-row distance matrix "
                       "makes it too slow for every layer here); naive_over_ours is over those layers"),
        "layers": rows,
        "totals": totals,
        "peak_memory_mb": peaks,
        "floor": "float32 products" + (" (and float64 products: floor64)" if dtype == torch.float64 else ""),
        "goals": {"ours_over_floor": "<= 1.5", "naive_over_ours": ">= 5",
                  "max_rel_diff_vs_float64": f"<= {TOLERANCE:g}"},
    }
    if not args.skip_measure:
        measure_s, measure_mb, report, measure_cpu = timed(lambda: measure(
            model, train, "all", seed=0, subset_size=10 * args.per_class,
            per_class_b=args.per_class, dtype=dtype, progress=False))
        result["measure_all_layers"] = {"seconds": measure_s, "cpu_seconds": measure_cpu,
                                        "peak_mb": measure_mb,
                                        "layers": len(report), "selected_Q": report.select(4, "Q")}
    result["max_rss_mb_ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["load_average_at_end"] = os.getloadavg()
    return result


def markdown(result: dict) -> str:
    """A BENCHMARKS.md section from a result dict (older files, with a float64 floor only, too)."""
    t = result["totals"]
    floor = result.get("floor", f"{result['dtype']} products")
    compared = "max_rel_diff_vs_float64" in t
    lines = [
        "## Knowledge-quality speed (`benchmarks/quality_speed.py`)",
        "",
        f"`{result['command']}` — {result['model']}, {result['n_a']} images of {result['data']}, "
        f"variant paper, {result['dtype']} products (ours), floor: {floor}; "
        f"{result['machine']['cpu_count']} CPUs, "
        f"{result['machine']['torch_threads']} torch threads, torch {result['machine']['torch']}. "
        f"Timing: {result['timing']}. Load average (1/5/15 min) at start "
        f"{'/'.join(f'{v:.1f}' for v in result['machine']['load_average'])}, at end "
        f"{'/'.join(f'{v:.1f}' for v in result['load_average_at_end'])}: a shared machine, "
        "so single timings are noisy.",
        "",
        "Wall-clock seconds (CPU seconds in brackets):",
        "",
        "| GL | D | ours | floor | ours/floor | naive | naive/ours | ours peak MB |"
        + (" max rel. diff. vs float64 |" if compared else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if compared else ""),
    ]
    for r in result["layers"]:
        naive = (f"{r['naive_s']:.1f} ({r['naive_cpu_s']:.1f}) | {_fmt(r['naive_over_ours'], 1)} "
                 f"({_fmt(r['naive_over_ours_cpu'], 1)})" if "naive_s" in r else "– | –")
        peak = f"{r['ours_peak_mb']:.0f}" if r["ours_peak_mb"] is not None else "–"
        diff = f" {r['max_rel_diff_vs_float64']:.1e} |" if compared else ""
        lines.append(f"| {r['index']} | {r['D']} | {r['ours_s']:.2f} ({r['ours_cpu_s']:.2f}) | "
                     f"{r['floor_s']:.2f} ({r['floor_cpu_s']:.2f}) | {_fmt(r['ours_over_floor'], 2)} "
                     f"({_fmt(r['ours_over_floor_cpu'], 2)}) | {naive} | {peak} |{diff}")
    lines += ["", f"Total: ours {t['ours_s']:.1f} s ({t['ours_cpu_s']:.1f}), floor {t['floor_s']:.1f} s "
                  f"({t['floor_cpu_s']:.1f}), ours/floor **{_fmt(t['ours_over_floor'], 2)}** "
                  f"({_fmt(t['ours_over_floor_cpu'], 2)}) (goal <= 1.5)."]
    if "ours_over_floor64" in t:
        lines.append(f"Against the float64 products: {t['floor64_s']:.1f} s, ours/float64 floor "
                     f"{_fmt(t['ours_over_floor64'], 2)}.")
    if compared:
        verdict = "within" if t["within_tolerance"] else "**outside**"
        lines.append(f"Float64 throughout on the same features: {t['float64_s']:.1f} s "
                     f"({t['float64_cpu_s']:.1f}), {_fmt(t['float64_over_ours'], 2)}x ours; the largest relative "
                     f"difference of S, I, E or Q from it is {t['max_rel_diff_vs_float64']:.1e}, {verdict} "
                     f"the spec's 1e-4.")
    if "naive_over_ours" in t:
        lines.append(f"Naive on layers {result['naive_layers']}: {t['naive_s_on_naive_layers']:.1f} s "
                     f"vs ours {t['ours_s_on_naive_layers']:.1f} s, naive/ours "
                     f"**{_fmt(t['naive_over_ours'], 1)}** ({_fmt(t['naive_over_ours_cpu'], 1)}) (goal >= 5). "
                     f"{result['naive_note']}.")
    p = result["peak_memory_mb"]
    lines.append(f"Peak memory growth (max over layers; growth of the process's peak resident set "
                 f"during the call, BLAS and allocator buffers included): ours {p['ours_peak_mb']} MB, "
                 f"floor {p['floor_peak_mb']} MB, naive {p['naive_peak_mb']} MB.")
    if "measure_all_layers" in result:
        m = result["measure_all_layers"]
        lines.append(f"`measure()` end to end, all {m['layers']} layers (feature extraction included): "
                     f"{m['seconds']:.1f} s ({m['cpu_seconds']:.1f} CPU s), peak memory growth "
                     f"{m['peak_mb']} MB.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args, argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
