"""The library's commands: predict, init-checkpoint, train, evaluate, compare, fit-ood, report,
bulk (`serve` and `render` come from serve/commands.py, the console script's entry point).

Thin wrappers over the library.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from orthovision.errors import InputError
from orthovision.paths import checkpoint_dir

log = logging.getLogger("orthovision")

EXIT_OK, EXIT_ERROR, EXIT_REJECTED = 0, 1, 2


def write_line(line: str, stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout  # looked up per call: tests and wrappers swap sys.stdout
    stream.write(line + "\n")
    stream.flush()


def _warn_if_untrained(card: dict) -> None:
    if not card.get("trained", False):
        write_line(
            "WARNING: this checkpoint has RANDOM, UNTRAINED weights: its outputs mean nothing "
            "and every class is unvalidated, so every result abstains.",
            sys.stderr,
        )


def cmd_predict(args: argparse.Namespace) -> int:
    from orthovision.model.checkpoint import load_checkpoint
    from orthovision.model.local import LocalPredictor

    checkpoint = load_checkpoint(args.checkpoint)
    _warn_if_untrained(checkpoint.card)
    predictor = LocalPredictor(checkpoint)
    if args.explain:
        args.explain.mkdir(parents=True, exist_ok=True)

    status = EXIT_OK
    for path in args.files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            write_line(f"{path}: cannot read file: {exc.strerror}", sys.stderr)
            status = EXIT_REJECTED
            continue
        try:
            prediction, prepared = predictor.predict(data)
        except InputError as exc:
            status = EXIT_REJECTED
            if args.json:
                write_line(json.dumps({"file": str(path), "error": exc.to_dict()}))
            write_line(f"{path}: rejected ({exc.code}): {exc.message}", sys.stderr)
            continue
        if args.explain:
            from orthovision.model.explain import explain, overlay_png

            target = predictor.cfg.model.classes.index(
                max(prediction.probabilities, key=prediction.probabilities.get)
            )
            expl = explain(predictor.model, prepared.pixels, target_class=target)
            out_png = args.explain / f"{path.stem}.gradcampp.png"
            out_png.write_bytes(
                overlay_png(prepared.pixels[0], expl.heatmap, predictor.cfg.explain.overlay_alpha)
            )
            prediction.explanation_url = out_png.resolve().as_uri()
        if args.json:
            write_line(json.dumps({"file": str(path), **prediction.model_dump(mode="json")}))
        else:
            top = max(prediction.probabilities, key=prediction.probabilities.get)
            shown = prediction.label or f"abstained ({prediction.abstain_reason})"
            warnings = [f["message"] for f in prediction.quality.model_dump()["findings"]]
            extra = f"; quality: {', '.join(warnings)}" if warnings else ""
            write_line(f"{path}: {shown}; top {top} p={prediction.probabilities[top]:.3f}{extra}")
    return status


def cmd_init_checkpoint(args: argparse.Namespace) -> int:
    import torch

    from orthovision.config import OrthoVisionConfig
    from orthovision.model.backbones import build_ensemble
    from orthovision.model.checkpoint import save_checkpoint

    cfg = OrthoVisionConfig.load(args.config)
    torch.manual_seed(args.seed)
    model = build_ensemble(cfg.model)
    path = save_checkpoint(
        model,
        cfg,
        args.out,
        validated_classes=[],
        trained=False,
        data={"note": f"random initialisation, seed {args.seed}; trained on no data"},
    )
    write_line(f"wrote untrained checkpoint to {path}")
    return EXIT_OK


def _config_with_overrides(path: Path | None, overrides: list[str]):
    """YAML config, then `section.key=value` overrides (values parsed as YAML)."""
    import yaml

    from orthovision.config import OrthoVisionConfig

    data: dict = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"override {item!r} is not KEY=VALUE (e.g. train.epochs=3)")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return OrthoVisionConfig.model_validate(data)


def cmd_train(args: argparse.Namespace) -> int:
    from orthovision.training.loop import train

    logging.getLogger("orthovision").setLevel(logging.INFO)
    cfg = _config_with_overrides(args.config, args.overrides)
    path = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    write_line(f"wrote checkpoint to {path}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from orthovision.evaluation.run import evaluate_checkpoint

    report = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        args.out,
        split=args.split,
        n_bootstrap=args.bootstrap,
        progress=not args.no_progress,
    )
    write_line(json.dumps(report.summary(), indent=1))
    return EXIT_OK


def cmd_fit_ood(args: argparse.Namespace) -> int:
    from orthovision.safety.fitting import fit_checkpoint_ood

    section = fit_checkpoint_ood(args.checkpoint, args.data)
    write_line(json.dumps(section, indent=1))
    return EXIT_OK


def cmd_guard_batch(args: argparse.Namespace) -> int:
    """The checkpoint's guard batch (onnx_backend.GUARD_FILE): preprocessed validation
    images, one per near-duplicate group, on which every ONNX replica is checked at start."""
    import numpy as np

    from orthovision.datasets.splits import one_per_group
    from orthovision.evaluation.run import split_samples
    from orthovision.model.checkpoint import load_checkpoint
    from orthovision.model.onnx_backend import GUARD_FILE

    ckpt = load_checkpoint(args.checkpoint)
    kept, pixels, _ = split_samples(ckpt, args.data, "val")
    chosen = one_per_group(kept, args.n)
    path = Path(args.checkpoint) / GUARD_FILE
    np.savez_compressed(path, pixels=pixels[chosen])
    write_line(f"wrote {path}: {len(chosen)} validation images, one per group")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from orthovision.training.compare import PAPER_BACKBONES, compare_backbones
    from orthovision.training.table import comparison_table

    logging.getLogger("orthovision").setLevel(logging.INFO)
    cfg = _config_with_overrides(args.config, args.overrides)
    rows = compare_backbones(
        cfg, args.backbones or PAPER_BACKBONES, args.out, progress=not args.no_progress
    )
    write_line(comparison_table(rows, cfg.train))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    """Offline counterpart of GET /v1/predictions/{id}/report.pdf: classify, explain, PDF."""
    from orthovision.clinical.figure import report_figure
    from orthovision.clinical.pdf import build_pdf_report
    from orthovision.imaging.display import display_png
    from orthovision.model.checkpoint import load_checkpoint
    from orthovision.model.explain import explain, heatmap_rgba_png, overlay_png
    from orthovision.model.local import LocalPredictor

    checkpoint = load_checkpoint(args.checkpoint)
    _warn_if_untrained(checkpoint.card)
    predictor = LocalPredictor(checkpoint)
    try:
        data = args.image.read_bytes()
        prediction, prepared = predictor.predict(data)
    except OSError as exc:
        write_line(f"{args.image}: cannot read file: {exc.strerror}", sys.stderr)
        return EXIT_REJECTED
    except InputError as exc:
        write_line(f"{args.image}: rejected ({exc.code}): {exc.message}", sys.stderr)
        return EXIT_REJECTED
    figure = None
    if not args.no_explain:
        probs = prediction.probabilities
        target = list(probs).index(max(probs, key=probs.get))
        heat = explain(
            predictor.model, prepared.pixels, target_class=target, content_box=prepared.content_box
        ).heatmap
        overlay = overlay_png(prepared.pixels[0], heat, predictor.cfg.explain.overlay_alpha)
        # Offline the source is at hand: the heat map goes onto its display rendering.
        source = display_png(data, predictor.cfg.decode)
        layer = heatmap_rgba_png(heat, prepared.pixels.shape[:0:-1])
        figure = report_figure(overlay, prepared.content_box, layer, source)
    out = args.out or args.image.with_suffix(".report.pdf")
    out.write_bytes(build_pdf_report(prediction.model_dump(mode="json"), figure))
    write_line(f"wrote {out}")
    return EXIT_OK


def cmd_bulk(args: argparse.Namespace) -> int:
    import asyncio

    from orthovision.client.bulk import RetryPolicy, discover, run_bulk

    paths = discover(args.source)
    try:
        summary = asyncio.run(
            run_bulk(
                paths,
                args.url,
                args.api_key or os.environ.get("ORTHOVISION_API_KEY"),
                args.out,
                concurrency=args.concurrency,
                policy=RetryPolicy(max_attempts=args.max_attempts),
                timeout_s=args.timeout,
                progress=not args.no_progress,
                explain=args.explain,
            )
        )
    except KeyboardInterrupt:
        write_line(
            f"interrupted: finished items are in {args.out}; run again to resume", sys.stderr
        )
        return 130
    for line in summary.lines():
        write_line(line, sys.stderr)
    return summary.exit_code()


def build_parser(extend: Callable[[Any], None] | None = None) -> argparse.ArgumentParser:
    """The library's commands; `extend(subparsers)` adds more (the serving package adds
    `serve` and `render`, so the library never imports it)."""
    parser = argparse.ArgumentParser(prog="orthovision", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    if extend is not None:
        extend(sub)

    p = sub.add_parser("predict", help="classify radiographs (PNG, JPEG, DICOM)")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--checkpoint", type=Path, default=checkpoint_dir())
    p.add_argument("--explain", type=Path, metavar="OUT_DIR", help="write GradCAM++ overlays here")
    p.add_argument("--json", action="store_true", help="one JSON result per line (v1 API schema)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("init-checkpoint", help="write a randomly initialised checkpoint")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init_checkpoint)

    p = sub.add_parser("train", help="train a checkpoint (train(cfg) -> folder)")
    p.add_argument("-c", "--config", type=Path, help="YAML config (OrthoVisionConfig)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.epochs=3")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "fit-ood",
        help="fit a trained checkpoint's out-of-distribution detector (train split features, "
        "validation threshold) and write it beside the weights",
    )
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="the dataset it was trained on")
    p.set_defaults(func=cmd_fit_ood)

    p = sub.add_parser(
        "guard-batch",
        help="write the validation images an ONNX Runtime replica is checked on at start",
    )
    p.add_argument("--checkpoint", type=Path, default=checkpoint_dir())
    p.add_argument("--data", type=Path, required=True, help="the dataset it was trained on")
    p.add_argument("--n", type=int, default=8, help="images (one per group)")
    p.set_defaults(func=cmd_guard_batch)

    p = sub.add_parser("evaluate", help="metrics, plots and report of a checkpoint on a dataset")
    p.add_argument("--checkpoint", type=Path, default=checkpoint_dir())
    p.add_argument("--data", type=Path, required=True, help="dataset folder (any layout)")
    p.add_argument("--out", type=Path, help="write metrics.json, PNG plots, report.md here")
    p.add_argument(
        "--split",
        choices=("all", "train", "val", "test"),
        default="all",
        help="images of the checkpoint's recorded split only (splits.csv, by sha256)",
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for AUC CIs")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="train backbones under identical conditions; print table")
    p.add_argument("-c", "--config", type=Path, help="YAML config (its train section is shared)")
    p.add_argument("--out", type=Path, required=True)
    # Comma-separated: a space-separated list would swallow the KEY=VALUE overrides.
    p.add_argument(
        "--backbones",
        type=lambda v: [b for b in v.split(",") if b],
        metavar="TIMM[:INIT],...",
        help="default: the paper's Table 04 backbones",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="PDF second-opinion report of one image (offline)")
    p.add_argument("image", type=Path)
    p.add_argument("--out", type=Path, help="PDF path (default: IMAGE.report.pdf)")
    p.add_argument("--checkpoint", type=Path, default=checkpoint_dir())
    p.add_argument("--no-explain", action="store_true", help="leave the heat map out")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bulk", help="send a folder or manifest to the service; NDJSON out")
    p.add_argument("source", type=Path, metavar="DIR_OR_MANIFEST")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", help="X-API-Key (default: $ORTHOVISION_API_KEY)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("results.ndjson"))
    p.add_argument("--max-attempts", type=int, default=8, help="per item, with backoff")
    p.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    p.add_argument("--explain", action="store_true", help="also queue GradCAM++ explanations")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bulk)
    return parser


def main(argv: list[str] | None = None, extend: Callable[[Any], None] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser(extend).parse_args(argv)
    from orthovision.model.card import CheckpointError

    try:
        return args.func(args)
    except CheckpointError as exc:
        write_line(f"checkpoint error: {exc}", sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
