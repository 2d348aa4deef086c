"""The prepare stage: source -> stratified splits + meta.json, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnpipe.atomic import atomic_dir, check_replaceable, write_json_atomic
from cnnpipe.config import Config
from cnnpipe.console import info, warn
from cnnpipe.data.checks import duplicate_lines, imbalance_line, run_checks, source_line
from cnnpipe.data.prepare import META_FILE, build_meta
from cnnpipe.data.preprocess import resolve_geometry
from cnnpipe.data.sources import Fit, load_source
from cnnpipe.data.split import SPLITS, stratified_split
from cnnpipe.data.store import Split, save_split


def prepare_splits(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """Load the configured source, split it, check it (duplicates, removed from val/test per `data.dedupe`; class
    balance; source sizes and modes), write `out_dir/{train,val,test}.npz` and meta.json."""
    names = [*(f"{name}.npz" for name in SPLITS), META_FILE]
    check_replaceable(out_dir, names)  # before decoding the source: a folder of someone else's is refused at once
    geometry = resolve_geometry(cfg.data, cfg.model)  # the model's input size, crop and interpolation
    raw = load_source(cfg.data, Fit(geometry.storage_size, geometry.interpolation))
    if raw.skipped:
        warn("prepare", f"skipped {len(raw.skipped)} unreadable image(s); listed in {out_dir / META_FILE}")
    splits = stratified_split(raw.labels, cfg.data.split, cfg.seed, raw.classes)
    checked = run_checks(raw, splits, cfg.data)  # a DataError here leaves nothing written
    splits = checked.splits
    meta = build_meta(cfg, raw, splits)
    meta["preprocess"] = geometry.as_dict()
    meta["checks"] = checked.section
    with atomic_dir(out_dir, names) as tmp:
        for name in SPLITS:
            save_split(tmp / f"{name}.npz", Split(raw.images, raw.labels), index=splits[name])
        write_json_atomic(tmp / META_FILE, meta)
    sizes = ", ".join(f"{s} {meta['counts'][s]['total']}" for s in SPLITS)
    info("prepare", f"{cfg.data.name}: {len(raw.classes)} classes, shape {meta['image_shape']}: {sizes}")
    if geometry.storage_size != geometry.input_size:
        info(
            "prepare",
            f"stored at {geometry.storage_size} px ({geometry.interpolation}) for {geometry.input_size} px crops "
            f"(crop_pct {geometry.crop_pct})",
        )
    report_checks(meta["checks"], out_dir / META_FILE)
    return meta


def report_checks(checks: dict[str, Any], meta_path: Path) -> None:
    """The checks' one-line warnings and notes (the details are in meta.json's "checks")."""
    duplicates, notes = duplicate_lines(checks, str(meta_path))
    for line in (source_line(checks), *notes):
        if line:
            info("prepare", line)
    for line in (*duplicates, imbalance_line(checks)):
        if line:
            warn("prepare", line)
