"""The GPU check: the CUDA path and a full-width resnet34 -> resnet9 mini-grid, in about seven minutes.

Prepared for a machine with one CUDA GPU (the CPU machines this project is built on have none):

    python benchmarks/gpu_check.py                         # -> benchmarks/results/gpu/gpu_check.json
    python benchmarks/gpu_check.py --data-root DIR         # Fashion-MNIST's .gz files in DIR
    python benchmarks/gpu_check.py --quick --device cpu    # the same commands in seconds, synthetic data

Every step is the real ``featkd`` command, run as a subprocess with its log in the work
directory; the results file is rewritten after each step. A rerun runs only the steps that
no earlier call with the same settings finished with the same command (a step whose command
has changed since runs again), and reuses a run directory that is complete: on the same
machine a timed-out check continues where it stopped; a fresh GPU machine, which keeps no
files between calls, trains its own teacher first. The results file records each call apart,
with its machine, commit and teacher. ``--steps`` names the steps to run instead (``all``:
every one).

1. ``teacher``: ``featkd train-teacher`` resnet34 at full width on Fashion-MNIST (55,000
   images, 5,000 held out for validation, augmentation), bf16 autocast.
2. The CUDA path, one epoch of featkd each: ``cuda_cached`` (teacher outputs computed once,
   held in RAM: about 25 GB; the memory-mapped cache has its CPU tests and was 1.5x slower
   than online on an H200), ``cuda_online`` (teacher run every step) and ``cuda_torchrun``
   (``torchrun --nproc_per_node 1``), then ``cuda_quality`` (``featkd quality`` of the
   teacher). Each must finish (a non-finite loss stops a run with an error).
3. The mini-grid: resnet9 at full width, one seed, ``--epochs`` epochs, ``--teacher-mode auto``:
   ce, kd, simkd, featkd (the paper's Q layers) and featkd_std.

The defaults fit one 10-minute call on an H200, with its start: the first run of the
check (2026-12-04, ``--teacher-epochs 5 --epochs 5``) took 53 s for the teacher, 36 to
86 s per CUDA-path step and 37 to 50 s per grid run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# a GPU machine may hold a bare checkout: the package is read from src/ when it is not installed
sys.path.append(str(Path(__file__).resolve().parents[1] / "src"))
import common  # noqa: E402
from featkd.selection import DEFAULT_RULE  # noqa: E402
from featkd.train import read_metrics  # noqa: E402

log = logging.getLogger("benchmarks.gpu_check")

GRID_METHODS = ("ce", "kd", "simkd", "featkd", "featkd_std")
STEP_NAMES = ("teacher", "cuda_cached", "cuda_online", "cuda_torchrun", "cuda_quality", *GRID_METHODS)
CACHE_IN_RAM_MB = 32768  # the featkd cache of full-width resnet34 on 55,000 images: about 25 GB
QUICK_DATA = ["--data", "synthetic", "--data-options",
              "num_classes:4,samples_per_class:12,test_per_class:4,in_channels:1", "--val-size", "8"]


@dataclass(frozen=True)
class Step:
    """One ``featkd`` command of the check and the run directory it writes."""

    name: str
    argv: list[str]
    out: Path
    launcher: tuple[str, ...] = (sys.executable, "-m", "featkd")
    done: str = "results.json"  # the file its command writes last

    @property
    def command(self) -> list[str]:
        return [*self.launcher, *self.argv, "--out", str(self.out)]

    def shown(self) -> str:
        """The command as a user would type it."""
        launcher = "torchrun --nproc_per_node 1 -m featkd" if "torch.distributed.run" in self.launcher else "featkd"
        return f"{launcher} {shlex.join(self.argv)} --out {self.out.name}"


def steps(args: argparse.Namespace, work: Path) -> list[Step]:
    """The teacher, the three CUDA-path runs and the grid, in order."""
    width = "1/16" if args.quick else "1"
    data = QUICK_DATA if args.quick else ["--data", "fashion_mnist", "--val-size", "5000"]
    if args.data_root and not args.quick:
        data += ["--data-root", args.data_root]
    shared = [*data, "--batch-size", str(args.batch_size), "--device", args.device, "--amp", args.amp,
              "--seed", "0", "--no-progress"]
    teacher = work / "teacher"
    found = [Step("teacher", ["train-teacher", "--model", "resnet34", "--width", width, "--augment",
                              "--epochs", str(args.teacher_epochs), *shared], teacher)]
    student = ["distill", "--teacher-checkpoint", str(teacher), "--student", "resnet9", "--student-width", width,
               *shared]
    featkd = [*student, "--method", "featkd", "--select-by", "Q/paper", "--epochs", "1"]
    cached = ["--teacher-mode", "cache", "--cache-memory-mb", str(CACHE_IN_RAM_MB)]
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                "-m", "featkd")
    found += [Step("cuda_cached", [*featkd, *cached], work / "cuda_cached"),
              Step("cuda_online", [*featkd, "--teacher-mode", "online"], work / "cuda_online"),
              Step("cuda_torchrun", [*featkd, *cached], work / "cuda_torchrun", torchrun),
              Step("cuda_quality", ["quality", "--checkpoint", str(teacher), "--device", args.device,
                                    "--no-progress"], work / "cuda_quality", done="quality.json")]
    for method in GRID_METHODS:
        layers = ["--select-by", "Q/paper"] if method == "featkd" else []
        found.append(Step(method, [*student, "--method", method, *layers, "--epochs", str(args.epochs),
                                   "--teacher-mode", "auto"], work / "grid" / method))
    return found


def run_step(step: Step, env: dict[str, str]) -> dict[str, Any]:
    """Run (or skip, when its run directory is complete) one step; its outcome and numbers."""
    done = step.out / step.done
    entry: dict[str, Any] = {"command": step.shown()}
    if not done.is_file():
        step.out.mkdir(parents=True, exist_ok=True)
        logfile = step.out.with_name(step.out.name + ".log")
        log.info("%s: %s", step.name, shlex.join(step.command))
        start = time.perf_counter()
        with open(logfile, "a") as stream:
            finished = subprocess.run(step.command, env=env, stdout=stream, stderr=subprocess.STDOUT)
        entry["wall_s"] = time.perf_counter() - start
        if finished.returncode != 0:
            return {**entry, "error": f"exit {finished.returncode}: {logfile.read_text()[-1500:]}"}
    results = common.read_json(done)
    if step.done == "quality.json":
        return {**entry, "layers_measured": len(results["layers"]), "selected": results["selected"][DEFAULT_RULE]}
    run = results["runs"][0] if "runs" in results else results
    entry.update({key: run.get(key) for key in ("final_test_acc", "final_val_acc", "train_time_s", "images_per_s")})
    # one epoch's speed varies on a shared machine: the spread tells how far one number can be trusted
    entry["images_per_s_per_epoch"] = [r["images_per_s"] for r in read_metrics(step.out)]
    entry["teacher_layers"] = results.get("teacher_layers")
    return entry


def check(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the steps this call asks for in order, the results file rewritten after each; 1 when one failed.

    Each call is recorded apart (its machine, commit, teacher and steps): a GPU machine keeps no
    files between calls, so a later call trains its own teacher and runs only the steps that no
    earlier call with the same settings finished.
    """
    work, results = Path(args.work), Path(args.results)
    path = results / "gpu_check.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.REPO_DIR / "src"), env.get("PYTHONPATH")]))
    settings = {"device": args.device, "amp": args.amp, "batch_size": args.batch_size,
                "teacher_epochs": args.teacher_epochs, "epochs": args.epochs, "quick": args.quick}
    calls = earlier_calls(path, settings)
    planned = steps(args, work)
    commands = {step.name: step.shown() for step in planned}
    wanted = chosen_steps(planned, args.steps, finished_steps(calls, commands))
    if not wanted:
        log.info("every step has run (%s); --steps all runs them again", path)
        return 0
    # every step is listed from the start, so that a check cut short shows what it did not reach
    call: dict[str, Any] = {**common.run_record(argv, None), "settings": settings,
                            "steps": {step.name: {"command": step.shown(), "pending": True} for step in wanted}}
    data = {"benchmark": "gpu_check", "planned": commands, "calls": [*calls, call], "complete": False}
    failed = []
    for step in wanted:
        if step.name != "teacher" and "error" in call["steps"].get("teacher", {}):
            call["steps"][step.name] = {"command": step.shown(), "error": "skipped: the teacher failed"}
            continue
        call["steps"][step.name] = entry = run_step(step, env)
        if "error" in entry:
            failed.append(step.name)
            log.error("%s failed: %s", step.name, entry["error"])
        else:
            log.info("%s: final test acc %s, %s images/s", step.name, entry.get("final_test_acc"),
                     entry.get("images_per_s"))
        common.write_json(path, data)
    call["finished"] = common.now()
    call["online_vs_cached_images_per_s"] = online_vs_cached(call["steps"])
    data["complete"] = set(commands) <= finished_steps(data["calls"], commands)
    common.write_json(path, data)
    print(json.dumps({name: {k: v for k, v in e.items() if k != "command"} for name, e in call["steps"].items()},
                     indent=1))
    return 1 if failed else 0


def earlier_calls(path: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The calls recorded in ``path`` with these settings (none when they differ: the check starts anew).

    A file written before calls were recorded apart holds one call at its top level.
    """
    if not path.is_file():
        return []
    found = common.read_json(path)
    calls = found.get("calls") or [{key: value for key, value in found.items() if key not in ("benchmark", "complete")}]
    if calls[-1].get("settings") != settings:
        log.info("%s was written with other settings (%s): starting anew", path, calls[-1].get("settings"))
        return []
    return calls


def finished_steps(calls: list[dict[str, Any]], commands: dict[str, str] | None = None) -> set[str]:
    """Names of the steps some call finished without an error; with ``commands`` (step name -> the
    command as shown), only those it ran with that same command (an older recipe does not count)."""
    return {name for call in calls for name, entry in call["steps"].items()
            if not entry.get("pending") and "error" not in entry
            and (commands is None or entry.get("command") == commands.get(name))}


def chosen_steps(planned: list[Step], names: str | None, finished: set[str]) -> list[Step]:
    """The steps to run: those named (``all``: every one), by default those not yet finished.

    The teacher comes first whenever another step runs: they all read it.
    """
    known = [step.name for step in planned]
    if names is None:
        wanted = {name for name in known if name not in finished}
    elif names == "all":
        wanted = set(known)
    else:
        wanted = {name.strip() for name in names.split(",") if name.strip()}
        if not wanted:
            raise ValueError(f"--steps names no step; the steps: {', '.join(known)}")
        if unknown := sorted(wanted - set(known)):
            raise ValueError(f"unknown step(s) {', '.join(unknown)}; the steps: {', '.join(known)}")
    if wanted:
        wanted.add("teacher")
    return [step for step in planned if step.name in wanted]


def online_vs_cached(steps: dict[str, Any]) -> float | None:
    """Images/s of the online-teacher step over the cached-teacher step; None unless both ran."""
    x, y = (steps.get(name, {}).get("images_per_s") for name in ("cuda_online", "cuda_cached"))
    return x / y if x and y else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (cpu only with --quick)")
    parser.add_argument("--amp", default="bf16", choices=("bf16", "none"), help="mixed precision of every step")
    parser.add_argument("--teacher-epochs", type=int, default=5, help="resnet34 teacher epochs")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of each grid run")
    parser.add_argument("--batch-size", type=int, default=128, help="images per optimizer step")
    parser.add_argument("--data-root", help="folder of the four Fashion-MNIST .gz files (default: "
                        "/usr/share/datasets/fashion-mnist, from the Debian package dataset-fashion-mnist)")
    parser.add_argument("--steps", help="comma-separated steps to run, or all (default: the steps no earlier "
                        "call with the same settings finished; the teacher runs whenever another step does)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny widths, synthetic data, 1 epoch: the commands, checked in seconds")
    parser.add_argument("--work", default=str(common.REPO_DIR / "benchmarks" / "work" / "gpu"),
                        help="run directories and logs")
    parser.add_argument("--results", default=str(common.REPO_DIR / "benchmarks" / "results" / "gpu"),
                        help="folder of gpu_check.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.quick:
        args.teacher_epochs, args.epochs, args.batch_size = 1, 1, 8
    elif not args.device.startswith("cuda"):
        print("gpu_check.py: error: --device must be cuda or cuda:N (cpu only with --quick)", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("gpu_check.py: error: no CUDA GPU here (torch.cuda.is_available() is False)", file=sys.stderr)
            return 2
    common.setup_logging()  # only once the arguments are accepted: a refusal configures nothing
    try:
        return check(args, [str(Path(__file__))] + argv)
    except ValueError as err:
        print(f"gpu_check.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
