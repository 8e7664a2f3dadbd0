"""``featkd quality``: knowledge quality of every teacher layer, and the best k."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from featkd.cli.common import CliError, build_model_from_args, parse_layers

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    """Register the ``quality`` sub-command."""
    from featkd.quality import SELECT_BY, VARIANTS

    parser = subparsers.add_parser(
        "quality",
        help="measure the knowledge quality Q = S + sqrt(I*E) of a model's layers",
        description="Measure S, I, E and Q for the generalized layers of a (trained) model on "
        "a dataset's training split; print the table and the k best layers; write "
        "quality.json and quality.png into --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True,
                        help="zoo model name (e.g. resnet34), torchvision:NAME or timm:NAME[:key=value,...]")
    parser.add_argument("--checkpoint", help="weights file or run directory (model.pt)")
    parser.add_argument("--data", required=True, help="dataset name, e.g. cifar100")
    parser.add_argument("--data-root", help="folder holding the dataset files")
    parser.add_argument("--width", type=float, default=1.0, help="model width multiplier")
    parser.add_argument("--layers", default="all", help="'all' or GL indices/module names, e.g. 3,7,13")
    parser.add_argument("--variant", choices=VARIANTS, default="paper")
    parser.add_argument("--k", type=int, default=4, help="number of layers to select")
    parser.add_argument("--by", choices=SELECT_BY, default="Q", help="criterion for the selection")
    parser.add_argument("--out", default="runs/quality", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsets A and B")
    parser.add_argument("--subset-size", type=int, default=5000, help="size of subset A")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--memory-gb", type=float, default=4.0, help="host memory budget (GB)")
    parser.add_argument("--float32", action="store_true",
                        help="float32 products accumulated in float64 (faster, slightly less exact)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Measure, print the table and the selection, write quality.json and quality.png."""
    from featkd.checkpoint import read_weights
    from featkd.data import get_datasets
    from featkd.layers import resolve_layers
    from featkd.quality import measure

    layers = parse_layers(args.layers)
    if isinstance(layers, str) and layers != "all":
        raise CliError(f"--layers {layers!r} is not valid here: give 'all' or GL indices/names")
    if args.k < 1:
        raise CliError(f"--k must be at least 1, got {args.k}")
    weights = read_weights(args.checkpoint) if args.checkpoint else None  # before the data: fails fast
    train, _ = get_datasets(args.data, root=args.data_root)
    channels, size, _ = train.image_shape
    model = build_model_from_args(args.model, args.width, train.num_classes, channels, size,
                                  checkpoint=weights)
    if layers != "all":
        try:
            resolve_layers(model, layers, model_name=args.model)
        except (IndexError, ValueError) as err:
            raise CliError(str(err)) from err
    report = measure(
        model, train, layers, variant=args.variant, seed=args.seed, device=args.device,
        batch_size=args.batch_size, memory_budget=int(args.memory_gb * 1024**3),
        subset_size=args.subset_size, dtype=torch.float32 if args.float32 else torch.float64,
        model_name=args.model,
    )
    report.settings.update(dataset=args.data, width=args.width, checkpoint=args.checkpoint)
    k = min(args.k, len(report))
    if k < args.k:
        logger.warning("only %d layers measured: selecting %d", len(report), k)
    selected = report.select(k, args.by)
    print(report.table(k, args.by))
    print(f"selected by {args.by} (k={k}): {','.join(str(i) for i in selected)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.to_json(out / "quality.json", k=k)
    report.plot(out / "quality.png", k=k, by=args.by)
    print(f"wrote {out / 'quality.json'} and {out / 'quality.png'}")
    return 0
