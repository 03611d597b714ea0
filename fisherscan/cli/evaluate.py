"""``fisherscan eval`` and ``fisherscan predict``: a tuned run on labelled data sets, or on plain images."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from ..errors import FisherscanError
from .app import app, console, print_paths, stdout, user_errors

_LAYOUT_HELP = ("auto|gta5|cityscapes|bdd100k|mapillary|acdc|generic; once for all, or once per --data (default: "
                "the run's --eval-layout for its folders, else auto)")
_RESIZE_HELP = "resize the input first: WIDTHxHEIGHT (e.g. 1024x512) or a scale factor (e.g. 0.5)"
_CHECKPOINT_HELP = "run folder written by 'fisherscan tune'"
_WEIGHTS_HELP = "base weights (file or Hugging Face folder), if not where the manifest says"
_CROP_HELP = "slide window size (0: whole image; default: the run's --eval-crop, else its --crop)"
_STRIDE_HELP = "slide window stride (default: the run's --eval-stride, else 2/3 of the window)"
MODEL, DATA, INFERENCE, RUN, OUTPUT = "Model", "Data", "Inference", "Run control", "Output"


def window(manifest: dict, crop: int | None, stride: int | None) -> tuple[int, int]:
    """--crop/--stride, or the run's evaluation window where not given."""
    from ..eval.runs import recorded_window

    run_crop, run_stride = recorded_window(manifest)
    crop = run_crop if crop is None else crop
    return crop, (stride if stride is not None else run_stride if crop == run_crop else max(1, (crop * 2) // 3))


@app.command("eval")
def eval_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help=_CHECKPOINT_HELP, rich_help_panel=MODEL),
    weights: Optional[Path] = typer.Option(None, "--weights", help=_WEIGHTS_HELP, rich_help_panel=MODEL),
    data: Optional[List[Path]] = typer.Option(None, "--data", rich_help_panel=DATA,
                                              help="labelled data set folder; repeat for several (default: the "
                                                   "folders the run evaluated with --eval)"),
    layout: Optional[List[str]] = typer.Option(None, "--layout", help=_LAYOUT_HELP, rich_help_panel=DATA),
    split: Optional[str] = typer.Option(None, "--split", rich_help_panel=DATA,
                                        help="dataset split where the layout has splits (default: the run's "
                                             "--eval-split for its folders, else val)"),
    images: Optional[int] = typer.Option(None, "--images", help="evaluate a seeded random subset of N images per set",
                                         rich_help_panel=DATA),
    seed: int = typer.Option(0, "--seed", help="seed of the --images subset", rich_help_panel=DATA),
    skip_bad: bool = typer.Option(False, "--skip-bad", rich_help_panel=DATA,
                                  help="skip unreadable or invalid image/label pairs (listed in eval.json) instead of "
                                       "stopping"),
    crop: Optional[int] = typer.Option(None, "--crop", help=_CROP_HELP, rich_help_panel=INFERENCE),
    stride: Optional[int] = typer.Option(None, "--stride", help=_STRIDE_HELP, rich_help_panel=INFERENCE),
    resize: Optional[str] = typer.Option(None, "--resize", help=_RESIZE_HELP, rich_help_panel=INFERENCE),
    keep_ratio: bool = typer.Option(False, "--keep-ratio", help="--resize WxH bounds the size, keeping the aspect",
                                    rich_help_panel=INFERENCE),
    score_at: str = typer.Option("original", "--score-at", rich_help_panel=INFERENCE,
                                 help="original: logits upsampled to the label (mmseg); resized: label resized"),
    batch_size: int = typer.Option(4, "--batch-size", help="slide windows per forward pass", rich_help_panel=INFERENCE),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda", rich_help_panel=RUN),
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes decoding images",
                                rich_help_panel=RUN),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for eval.json and eval.csv (default RUN/eval)",
                                       rich_help_panel=OUTPUT),
) -> None:
    """mIoU per data set (confusion matrix over the whole set, 19 classes) and their mean; JSON and CSV saved.
    Without --data, on the folders the run evaluated with --eval."""
    from ..data.datasets import skipped_note
    from ..eval.evaluate import evaluate_datasets, prepare_datasets, results_table, save_results
    from ..eval.inference import SCORE_AT, check_window, parse_resize
    from ..eval.runs import load_run, read_manifest, recorded_targets
    from ..runtime import resolve_device

    with user_errors():
        manifest = read_manifest(checkpoint)
        if not data:
            data, run_layout, run_split = recorded_targets(checkpoint, manifest)
            layout, split = layout or [run_layout], split or run_split
        layout, split = layout or ["auto"], split or "val"
        crop, stride = window(manifest, crop, stride)
        parse_resize(resize)
        check_window(crop, stride)
        if score_at not in SCORE_AT:
            raise FisherscanError(f"--score-at {score_at}: use one of {', '.join(SCORE_AT)}")
        target = out if out is not None else checkpoint / "eval"
        torch_device = resolve_device(device)
        datasets = prepare_datasets(data, layout, split, images, seed, skip_bad)  # wrong folders fail before the model
        segmenter, manifest = load_run(checkpoint, weights, torch_device)
        result = evaluate_datasets(segmenter, datasets, crop=crop, stride=stride, resize=resize, keep_ratio=keep_ratio,
                                   score_at=score_at, device=torch_device, split=split, images=images, seed=seed,
                                   workers=workers, batch_size=batch_size, console=console)
        result.options["checkpoint"] = str(checkpoint)
        result.options["model"] = manifest.get("model")
        json_path, csv_path = save_results(result, target)
        stdout.print(f"{manifest.get('model')} ({checkpoint}), IoU % per class, crop {crop} stride {stride}"
                     + (f" resize {resize}" if resize else ""), markup=False, highlight=False, soft_wrap=True)
        stdout.print(results_table(result))
        stdout.print(f"mIoU (mean of {len(result.datasets)} data sets): {100 * result.miou:.2f}", markup=False,
                     highlight=False)
        for dataset in datasets:
            if dataset.skipped:
                stdout.print(f"[yellow]note:[/] {escape(dataset.name)}: "
                             f"{escape(skipped_note(dataset.skipped, len(dataset.pairs) + len(dataset.skipped)))}",
                             highlight=False)
        print_paths(("json", json_path), ("table", csv_path))


@app.command()
def predict(
    checkpoint: Path = typer.Option(..., "--checkpoint", help=_CHECKPOINT_HELP, rich_help_panel=MODEL),
    weights: Optional[Path] = typer.Option(None, "--weights", help=_WEIGHTS_HELP, rich_help_panel=MODEL),
    source: Optional[Path] = typer.Option(None, "--input", rich_help_panel=DATA,
                                          help="folder of png/jpg images (searched recursively), or one image"),
    source_alias: Optional[Path] = typer.Option(None, "--images", hidden=True, help="old spelling of --input"),
    crop: Optional[int] = typer.Option(None, "--crop", help=_CROP_HELP, rich_help_panel=INFERENCE),
    stride: Optional[int] = typer.Option(None, "--stride", help=_STRIDE_HELP, rich_help_panel=INFERENCE),
    resize: Optional[str] = typer.Option(None, "--resize", help=_RESIZE_HELP, rich_help_panel=INFERENCE),
    keep_ratio: bool = typer.Option(False, "--keep-ratio", help="--resize WxH bounds the size, keeping the aspect",
                                    rich_help_panel=INFERENCE),
    batch_size: int = typer.Option(4, "--batch-size", help="slide windows per forward pass", rich_help_panel=INFERENCE),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda", rich_help_panel=RUN),
    out: Optional[Path] = typer.Option(None, "--out", rich_help_panel=OUTPUT,
                                       help="folder for the colour-coded segmentation PNGs (default RUN/predictions)"),
    overlay: bool = typer.Option(False, "--overlay", help="also write <name>_overlay.png: colours on the input",
                                 rich_help_panel=OUTPUT),
    alpha: float = typer.Option(0.5, "--alpha", help="weight of the colours in --overlay", rich_help_panel=OUTPUT),
) -> None:
    """Segment images: palette PNGs in the Cityscapes colours (pixel values are the trainIds)."""
    from ..eval.inference import check_window, parse_resize
    from ..eval.predict import find_images, predict_images
    from ..eval.runs import load_run, read_manifest
    from ..runtime import resolve_device

    with user_errors():
        if source is not None and source_alias is not None:
            raise FisherscanError("--input and --images (its old spelling) both given; pass --input only")
        source = source if source is not None else source_alias
        if source is None:
            raise FisherscanError("--input: missing; pass a folder of png/jpg images or one image")
        manifest = read_manifest(checkpoint)
        crop, stride = window(manifest, crop, stride)
        out = out if out is not None else checkpoint / "predictions"
        parse_resize(resize)
        check_window(crop, stride)
        if not 0.0 <= alpha <= 1.0:
            raise FisherscanError(f"--alpha {alpha}: must be between 0 and 1")
        find_images(source, exclude=out)  # a wrong folder fails before the model loads
        torch_device = resolve_device(device)
        segmenter, _ = load_run(checkpoint, weights, torch_device)
        result = predict_images(segmenter, source, out, crop=crop, stride=stride, resize=resize, keep_ratio=keep_ratio,
                                overlay=overlay, alpha=alpha, device=torch_device, batch_size=batch_size,
                                console=console)
        segmented = f"{result.images} image{'s' if result.images != 1 else ''} segmented"
        stdout.print(segmented + (" (with overlays)" if overlay else ""), markup=False,
                     highlight=False)
        print_paths(("predictions", out))
