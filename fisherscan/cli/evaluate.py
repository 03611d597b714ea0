"""``fisherscan eval`` and ``fisherscan predict``: a tuned run on labelled data sets, or on plain images."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from ..errors import FisherscanError
from .app import app, console, print_paths, stdout, user_errors

_LAYOUT_HELP = "auto|gta5|cityscapes|bdd100k|mapillary|acdc|generic; once for all, or once per --data"
_RESIZE_HELP = "resize the input first: WIDTHxHEIGHT (e.g. 1024x512) or a scale factor (e.g. 0.5)"


@app.command("eval")
def eval_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="run folder written by 'fisherscan tune'"),
    data: List[Path] = typer.Option(..., "--data", help="labelled data set folder; repeat for several"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="base weights (file or Hugging Face folder), if "
                                                                    "not where the manifest says"),
    crop: int = typer.Option(512, "--crop", help="slide window size (0: whole image)"),
    stride: int = typer.Option(341, "--stride", help="slide window stride"),
    resize: Optional[str] = typer.Option(None, "--resize", help=_RESIZE_HELP),
    keep_ratio: bool = typer.Option(False, "--keep-ratio", help="--resize WxH bounds the size, keeping the aspect"),
    score_at: str = typer.Option("original", "--score-at",
                                 help="original: logits upsampled to the label (mmseg); resized: label resized"),
    layout: List[str] = typer.Option(["auto"], "--layout", help=_LAYOUT_HELP),
    split: str = typer.Option("val", "--split", help="dataset split where the layout has splits"),
    images: Optional[int] = typer.Option(None, "--images", help="evaluate a seeded random subset of N images per set"),
    seed: int = typer.Option(0, "--seed", help="seed of the --images subset"),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda"),
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes decoding images"),
    batch_size: int = typer.Option(4, "--batch-size", help="slide windows per forward pass"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for eval.json and eval.csv (default RUN/eval)"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip unreadable or invalid image/label pairs (listed in "
                                                            "eval.json) instead of stopping"),
) -> None:
    """mIoU per data set (confusion matrix over the whole set, 19 classes) and their mean; JSON and CSV saved."""
    from ..data.datasets import skipped_note
    from ..eval.evaluate import evaluate_datasets, prepare_datasets, results_table, save_results
    from ..eval.inference import SCORE_AT, check_window, parse_resize
    from ..eval.runs import load_run
    from ..runtime import resolve_device

    with user_errors():
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
    checkpoint: Path = typer.Option(..., "--checkpoint", help="run folder written by 'fisherscan tune'"),
    images: Path = typer.Option(..., "--images", help="folder of png/jpg images (searched recursively), or one image"),
    out: Path = typer.Option(..., "--out", help="folder for the colour-coded segmentation PNGs"),
    overlay: bool = typer.Option(False, "--overlay", help="also write <name>_overlay.png: colours on the input"),
    alpha: float = typer.Option(0.5, "--alpha", help="weight of the colours in --overlay"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="base weights (file or Hugging Face folder), if "
                                                                    "not where the manifest says"),
    crop: int = typer.Option(512, "--crop", help="slide window size (0: whole image)"),
    stride: int = typer.Option(341, "--stride", help="slide window stride"),
    resize: Optional[str] = typer.Option(None, "--resize", help=_RESIZE_HELP),
    keep_ratio: bool = typer.Option(False, "--keep-ratio", help="--resize WxH bounds the size, keeping the aspect"),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda"),
    batch_size: int = typer.Option(4, "--batch-size", help="slide windows per forward pass"),
) -> None:
    """Segment images: palette PNGs in the Cityscapes colours (pixel values are the trainIds)."""
    from ..eval.inference import check_window, parse_resize
    from ..eval.predict import find_images, predict_images
    from ..eval.runs import load_run
    from ..runtime import resolve_device

    with user_errors():
        parse_resize(resize)
        check_window(crop, stride)
        if not 0.0 <= alpha <= 1.0:
            raise FisherscanError(f"--alpha {alpha}: must be between 0 and 1")
        find_images(images, exclude=out)  # a wrong folder fails before the model loads
        torch_device = resolve_device(device)
        segmenter, _ = load_run(checkpoint, weights, torch_device)
        result = predict_images(segmenter, images, out, crop=crop, stride=stride, resize=resize, keep_ratio=keep_ratio,
                                overlay=overlay, alpha=alpha, device=torch_device, batch_size=batch_size,
                                console=console)
        segmented = f"{result.images} image{'s' if result.images != 1 else ''} segmented"
        stdout.print(segmented + (" (with overlays)" if overlay else ""), markup=False,
                     highlight=False)
        print_paths(("predictions", out))
