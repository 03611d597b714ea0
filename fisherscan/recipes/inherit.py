"""What ``tune`` takes from the scores file it starts from: the model and its weights, the data, the crop, the
decoder and the head ``score`` warmed up (``INHERITED``). Images, seed, batch size and steps are tune's own.

Paths: scores files record absolute paths; an older file's relative path is read against the folder the scoring
ran in (``fisherscan.io.recorded_base``: the scores file's folder when it was written there). A recorded path that
no longer exists is one error naming it and the option that replaces it (``check_recorded``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import FisherscanError
from ..io import read_info, recorded_base, resolve_recorded

INHERITED = ("model", "weights", "random_init", "strict", "data", "layout", "split", "crop", "decoder",
             "feature_blocks", "head")
# what a recorded path is, and the option that replaces it when it no longer exists
REPLACED_BY = {"data": ("data folder", "--data FOLDER"), "weights": ("weights file", "--weights FILE")}
WARM_UP_INSTEAD = "--warmup-steps N to warm up a new head"


@dataclass
class ScoresRecord:
    """A scores file's metadata and what tune takes from it."""

    path: Path
    meta: dict
    values: dict  # field name -> value the file records (paths absolute); only what it records
    head: Path | None  # the head ``score`` saved beside the scores (absolute), whether or not it still exists


def read_record(path: Path) -> ScoresRecord:
    """The inherited values of the scores file ``path`` (a one-line error for a file fisherscan did not write)."""
    path = Path(os.path.abspath(path))
    if not path.is_file():
        raise FisherscanError(f"--scores {path}: no such scores file; run 'fisherscan score ... --out {path}' first")
    meta = read_info(path, "scores", "pass a scores file written by 'fisherscan score'")
    options = meta.get("options") if isinstance(meta.get("options"), dict) else {}
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    base = recorded_base(path, options.get("out"))
    weights = options.get("weights") if "options" in meta else meta.get("weights")
    found = {"model": options.get("model", meta.get("model")),
             "weights": None if weights == "timm-pretrained" else resolve_recorded(weights, base),
             "random_init": options.get("random_init", meta.get("random_init")),
             "strict": options.get("strict"),
             "data": resolve_recorded(options.get("data", data.get("path")), base),
             "layout": options.get("layout", data.get("layout")),
             "split": options.get("split", data.get("split")),
             "crop": options.get("crop", meta.get("crop")),
             "decoder": options.get("decoder", meta.get("decoder")),
             "feature_blocks": tuple(options["feature_blocks"]) if options.get("feature_blocks") else None}
    # a value the file does not record is not inherited (weights and feature blocks: None is a recorded choice)
    values = {k: v for k, v in found.items() if v is not None or (k in ("weights", "feature_blocks") and options)}
    head = resolve_recorded(meta.get("head"), base) if meta.get("head") else None
    return ScoresRecord(path, meta, values, head)


def check_recorded(record: ScoresRecord, values: dict, sources: dict) -> None:
    """A data folder or weights file taken from the scores must still exist: else one error naming it and the
    option that replaces it."""
    for name, (what, option) in REPLACED_BY.items():
        value = values.get(name)
        if sources.get(name, "").startswith("scores") and value is not None and not Path(value).exists():
            raise FisherscanError(f"the {what} {value} recorded in --scores {record.path} no longer exists; pass "
                                  f"{option}")


def head_mismatch(head: Path, decoder: str, feature_blocks) -> tuple[str, str, str] | None:
    """Why the head file ``head`` does not fit a ``decoder`` reading ``feature_blocks``: (option, its value, what the
    head was trained with), or None when it fits."""
    info = read_info(head, "head", "pass --head FILE, or " + WARM_UP_INSTEAD)
    saved = info.get("decoder_spec", info.get("decoder"))
    if saved is not None and saved != decoder:
        return "--decoder", decoder, f"the {saved} decoder"
    blocks = info.get("feature_blocks")
    if feature_blocks is not None and blocks is not None and list(blocks) != list(feature_blocks):
        return ("--feature-blocks", ",".join(map(str, feature_blocks)),
                f"feature blocks {','.join(map(str, blocks))}")
    return None


def check_head(record: ScoresRecord, values: dict, sources: dict) -> None:
    """The head tune will start from: ``--head`` must exist; the head beside the scores must exist (unless
    ``--warmup-steps`` is given on the command line) and fit the decoder (unless ``--warmup-steps`` is given, or set
    by a config file): else a new head is warmed up."""
    given = values.get("head")
    if given is not None:
        if not Path(given).is_file():
            raise FisherscanError(f"--head {given}: no such file; pass a head saved by 'fisherscan score', or leave "
                                  "--head out to start from the one beside the scores")
        return
    warm = sources.get("warmup_steps", "default") != "default"  # --warmup-steps, or a config file (a replay) sets it
    if record.head is None:
        return
    if not record.head.is_file():
        if sources.get("warmup_steps") == "option":  # asked for on the command line: a new head, knowingly
            return
        raise FisherscanError(f"the head {record.head} recorded in --scores {record.path} no longer exists; pass "
                              f"--head FILE, or {WARM_UP_INSTEAD}")
    mismatch = head_mismatch(record.head, values.get("decoder", "linear"), values.get("feature_blocks"))
    if mismatch is not None and not warm:
        option, value, trained = mismatch
        source = sources.get(option[2:].replace("-", "_"), "option")
        given_by = "" if source == "option" else f" (from {source})"
        raise FisherscanError(f"{option} {value}{given_by}: --scores {record.path} was computed with {trained}, so "
                              f"the head beside it does not fit; score with {option} {value}, or pass "
                              f"{WARM_UP_INSTEAD}")


def fitting_head(record_head: Path | None, decoder: str, feature_blocks) -> Path | None:
    """The head beside the scores when it exists and fits the decoder, else None (a new head is warmed up)."""
    if record_head is None or not Path(record_head).is_file():
        return None
    return None if head_mismatch(Path(record_head), decoder, feature_blocks) else Path(record_head)


def default_run_folder(scores: Path) -> Path:
    """``--out`` of ``tune`` by default: ``<stem>-run`` beside the scores file."""
    scores = Path(scores)
    return scores.with_name(scores.name.removesuffix(".safetensors") + "-run")
