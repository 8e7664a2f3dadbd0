"""``featkd quality``: knowledge quality of every teacher layer, and the best k."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

import torch

from featkd.cli.common import CliError, DefaultsHelpFormatter, build_model_from_args, parse_layers

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    """Register the ``quality`` sub-command."""
    from featkd.quality import VARIANTS
    from featkd.selection import DEFAULT_RULE, PAPER_RULE

    parser = subparsers.add_parser(
        "quality",
        help="measure the knowledge quality Q = S + sqrt(I*E) of a model's layers",
        description="Measure S, I, E, Q and a linear probe's accuracy for the generalized layers of a "
        "(trained) model on a dataset's training split; print the table and the k layers a "
        "selection rule chooses; write quality.json and quality.png into --out. With a "
        "train-teacher run directory as --checkpoint, the model, width, image size and data "
        "come from its config.yaml unless given (its validation split, if it held one out, "
        "scores the linear probe).",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--model", "--teacher", dest="model",
                        help="the teacher to measure: zoo model name (e.g. resnet34), torchvision:NAME or "
                        "timm:NAME[:key=value,...] (default: the run directory's)")
    parser.add_argument("--checkpoint", help="weights file or run directory (model.pt, config.yaml)")
    parser.add_argument("--data", help="dataset name, e.g. cifar100 (default: the run directory's)")
    parser.add_argument("--data-root", help="folder holding the dataset files")
    parser.add_argument("--data-options", metavar="OPTIONS",
                        help="extra dataset options, e.g. download:true or samples_per_class:8 (added to "
                        "the run directory's when its data are used)")
    parser.add_argument("--val-size", type=int, metavar="SIZE",
                        help="hold out a stratified validation split of this many training images, as "
                        "distill --val-size does: quality is measured on the rest, the probe scored on it "
                        "(default: the run directory's when its data are used, i.e. without --data)")
    parser.add_argument("--train-limit", type=int, metavar="LIMIT",
                        help="keep a stratified subset of this many training images (default: the run "
                        "directory's when its data are used, i.e. without --data)")
    parser.add_argument("--width", type=_width, help="model width multiplier, e.g. 0.125 or 1/8 (default: "
                        "the run directory's, else 1)")
    parser.add_argument("--image-size", type=int, help="image size in pixels (default: the run "
                        "directory's, else the dataset's)")
    parser.add_argument("--layers", default="all", help="'all' or GL indices/module names, e.g. 3,7,13")
    parser.add_argument("--variant", choices=VARIANTS, help="knowledge-quality variant (default: the "
                        "--by rule's, e.g. corrected for bands:Q/corrected, else paper)")
    parser.add_argument("--k", type=int, default=4, help="number of layers to select")
    parser.add_argument("--by", metavar="RULE",
                        help=f"selection rule: Q, S, I, E, sqrtIE, depth, probe or bands:SCORE (the best "
                        f"layer by SCORE in each of k depth bands); a quality score may name its variant, "
                        f"e.g. bands:Q/corrected; {PAPER_RULE} is the paper's (default: {DEFAULT_RULE}, "
                        "in --variant when that is given)")
    parser.add_argument("--out", default="runs/quality", help="output folder")
    parser.add_argument("--data-seed", type=int, metavar="SEED",
                        help="seed of the data drawn (the --train-limit subset, generated datasets), as "
                        "distill --data-seed (default: the run directory's when its data are used, else 0)")
    parser.add_argument("--seed", type=int, help="seed of the subsets A and B, and of a model without "
                        "--checkpoint (default: the data seed, as --teacher-layers auto draws them)")
    parser.add_argument("--subset-size", type=int, default=5000, help="size of subset A")
    parser.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--memory-gb", type=float, default=4.0,
                        help="memory budget in GiB: half for the stored features (host), half for "
                        "each layer's computation (on --device)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="a progress bar (only on a terminal)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="product precision: float32 accumulated in float64 (fast on any GPU and "
                        "CPU, within 1e-4 of float64), or float64 throughout")
    parser.set_defaults(func=run)


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Model, width, image size and data: the options given, else the run directory's config.yaml."""
    run = _run_config(args.checkpoint)
    data_from_run = run is not None and args.data is None
    settings = {
        "model": args.model or (run.model if run is not None else None),
        "width": args.width if args.width is not None else (run.width if run is not None else 1.0),
        "image_size": args.image_size if args.image_size is not None else (run.image_size if run is not None else None),
        "data": args.data or (run.data if run is not None else None),
        "data_root": args.data_root or (run.data_root if data_from_run else None),
        "data_options": {**(run.data_options if data_from_run else {}), **_data_options(args.data_options)},
        "train_limit": args.train_limit if args.train_limit is not None else (
            run.train_limit if data_from_run else None),
        "val_size": args.val_size if args.val_size is not None else (run.val_size if data_from_run else None),
        "data_seed": args.data_seed if args.data_seed is not None else (run.data_seed if data_from_run else 0),
    }
    for key in ("model", "data"):
        if settings[key] is None:
            raise CliError(f"give --{key} (or a train-teacher run directory as --checkpoint)")
    return settings


def _width(text: str) -> float:
    from featkd.config import parse_value

    try:
        return parse_value(text, float, "--width")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _data_options(text: str | None) -> dict[str, Any]:
    from featkd.config import parse_value

    try:
        return parse_value(text or "{}", dict[str, Any], "--data-options")
    except ValueError as err:
        raise CliError(str(err)) from None


def _run_config(checkpoint: str | None) -> Any:
    """The TrainConfig of a train-teacher run directory, or None for a file or another kind of run."""
    from featkd.api import run_config_file
    from featkd.config import TrainConfig

    path = run_config_file(checkpoint) if checkpoint and Path(checkpoint).is_dir() else None
    if path is None:
        return None
    try:
        return TrainConfig.from_yaml(path)
    except ValueError as err:
        logger.warning("%s is not a train-teacher config (%s): using the options only",
                       path, str(err).splitlines()[0])
        return None


def run(args: argparse.Namespace) -> int:
    """Measure, print the table and the selection, write quality.json and quality.png."""
    from featkd.api import check_teacher_inputs, sample_input
    from featkd.checkpoint import read_weights
    from featkd.data import check_data_options, load_splits
    from featkd.layers import resolve_layers
    from featkd.models import check_classifier
    from featkd.quality import measure
    from featkd.selection import measure_variant, resolve_rule
    from featkd.train import resolve_device, show_progress

    layers = parse_layers(args.layers)
    if isinstance(layers, str) and layers != "all":
        raise CliError(f"--layers {layers!r} is not valid here: give 'all' or GL indices/names")
    for option, value in (("--k", args.k), ("--batch-size", args.batch_size), ("--subset-size", args.subset_size)):
        if value < 1:
            raise CliError(f"{option} must be at least 1, got {value}")
    for option, value in (("--seed", args.seed), ("--data-seed", args.data_seed)):
        if value is not None and value < 0:
            raise CliError(f"{option} must be at least 0, got {value}")
    if not 0 < args.memory_gb < math.inf:
        raise CliError(f"--memory-gb must be a positive number, got {args.memory_gb}")
    try:
        rule = resolve_rule(args.by, args.variant)
        variant = measure_variant(rule, args.variant)
    except ValueError as err:
        raise CliError(f"--by: {err}") from err
    device = resolve_device(args.device)
    weights = read_weights(args.checkpoint) if args.checkpoint else None  # before the data: fails fast
    settings = run_settings(args)
    seed = args.seed if args.seed is not None else settings["data_seed"]
    if weights is None:
        logger.warning("no --checkpoint: measuring a randomly initialised %s (seed %d), "
                       "not a trained teacher", settings["model"], seed)
    check_data_options(settings["data_options"],  # the arguments given below
                       ("name", "root", "image_size", "train_limit", "seed", "val_size"))
    splits = load_splits(settings["data"], root=settings["data_root"], image_size=settings["image_size"],
                         train_limit=settings["train_limit"], seed=settings["data_seed"],
                         val_size=settings["val_size"], **settings["data_options"])
    train = splits.train
    channels, size, _ = train.image_shape
    with torch.random.fork_rng(devices=[]):  # without a checkpoint: the same model for the same --seed
        torch.manual_seed(seed)
        model = build_model_from_args(settings["model"], settings["width"], train.num_classes, channels,
                                      size, checkpoint=weights)
    check_classifier(model, sample_input(train), train.num_classes, training=False)  # it can take the data's images
    if args.checkpoint:
        check_teacher_inputs(args.checkpoint, train)
    if layers != "all":
        try:
            resolve_layers(model, layers, model_name=settings["model"])
        except (IndexError, ValueError) as err:
            raise CliError(str(err)) from err
    report = measure(
        model, train, layers, variant=variant, seed=seed, device=device,
        batch_size=args.batch_size, memory_budget=int(args.memory_gb * 1024**3),
        subset_size=args.subset_size, dtype=getattr(torch, args.dtype), model_name=settings["model"],
        probe_set=splits.val, progress=show_progress(args.progress),
    )
    report.settings.update(dataset=settings["data"], width=settings["width"], image_size=size,
                           checkpoint=args.checkpoint)
    k = min(args.k, len(report))
    if k < args.k:
        logger.warning("only %d layers measured: selecting %d", len(report), k)
    selected = report.select(k, rule.name)
    print(report.table(k, rule.name))
    print(f"selected by {rule.name} (k={k}): {','.join(str(i) for i in selected)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.to_json(out / "quality.json", k=k)
    report.plot(out / "quality.png", k=k, by=rule.name)
    print(f"wrote {out / 'quality.json'} and {out / 'quality.png'}")
    return 0
