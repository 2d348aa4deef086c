"""prepare_checks: what prepare's data checks (data/checks.py: exact and near duplicates within and across splits,
class counts, source summary) add to the prepare stage on a folder of 20,000 JPEGs.

The data: 20,000 JPEGs of 320x240 in 10 classes, smooth random pictures (a coarse random colour grid upscaled
bicubically, a little grain), not noise, so JPEG and the perceptual hash behave as on photos. 1 % of them are
planted duplicates of another image of the same class: half byte-identical copies, half re-encoded at JPEG
quality 70. The folder is generated once into a cache folder (`--cache`, default
$XDG_CACHE_HOME/cnnpipe-bench or ~/.cache/cnnpipe-bench) and reused.

Measured: cnnpipe's own prepare (`prepare_splits`, in process) with `model=timm model.arch=resnet50.a1_in1k`
(stored at 235 px for 224-px crops), and inside the same run the time spent in `run_checks` (timed around the real
call). Ratio: checks / the rest of prepare (decoding, splitting, statistics, writing). Goal: <= 0.10. Also
recorded: the split of the checks' time (phash, exact hashing, pair comparison), how many of the planted
duplicates that landed across splits were found, the peak RSS and the 1-min load average before and after.

Run alone: python -m bench.prepare_checks [--quick] [--repeats N] [--images N] [--cache DIR]
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.timing import cli, median, pin_threads, result, spread, write_result
from bench.workspace import bench_config

NAME = "prepare_checks"
IMAGES = 20_000
CLASSES = 10
WIDTH, HEIGHT = 320, 240
PLANTED = 0.01  # fraction of the images that are copies of another of their class
ARCH = "resnet50.a1_in1k"
GOAL = 0.10


def smooth_image(rng: Any, width: int = WIDTH, height: int = HEIGHT) -> Any:
    """uint8 (height, width, 3): random colour grids of 3, 6, 12, 24 and 48 cells across, upscaled bicubically and
    summed with amplitudes halving per octave (a photo's 1/f spectrum, roughly), plus grain (sigma 2)."""
    import numpy as np
    from PIL import Image

    out = np.zeros((height, width, 3), dtype=np.float32)
    for octave, cells in enumerate((3, 6, 12, 24, 48)):
        grid = rng.normal(0, 1, (max(2, cells * height // width), cells, 3)).astype(np.float32)
        planes = [
            Image.fromarray(grid[..., c], mode="F").resize((width, height), Image.Resampling.BICUBIC) for c in range(3)
        ]
        out += np.stack([np.asarray(p) for p in planes], axis=-1) * (0.5**octave)
    out = 128 + out * (60 / max(1e-6, float(out.std())))
    return np.clip(out + rng.normal(0, 2, out.shape), 0, 255).astype(np.uint8)


def make_folder(root: Path, images: int, seed: int = 0) -> Path:
    """`images` JPEGs in CLASSES class folders, PLANTED of them duplicates (`*_copy.jpg` byte-identical,
    `*_q70.jpg` re-encoded) of an image of the same class; written once, `root/.complete` marks it done."""
    import numpy as np
    from PIL import Image

    if (root / ".complete").is_file():
        return root
    rng = np.random.default_rng(seed)
    per_class = images // CLASSES
    planted = max(2, round(per_class * PLANTED))
    for c in range(CLASSES):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class - planted):
            Image.fromarray(smooth_image(rng)).save(folder / f"{i:05d}.jpg", quality=90)
        for k in range(planted):
            original = folder / f"{k:05d}.jpg"
            if k % 2:
                (folder / f"{k:05d}_copy.jpg").write_bytes(original.read_bytes())
            else:
                with Image.open(original) as img:
                    img.save(folder / f"{k:05d}_q70.jpg", quality=70)
        print(f"[{NAME}] generated class {c + 1}/{CLASSES} in {root}", flush=True)
    (root / ".complete").write_text(f"{images} images, seed {seed}\n")
    return root


def planted_found(meta: dict[str, Any]) -> dict[str, int]:
    """How many (original, planted copy) pairs meta.json lists: exact groups for copies, near pairs for q70s."""
    checks = meta["checks"]["duplicates"]
    pairs = {
        frozenset((a["file"], b["file"]))
        for g in checks["exact"]["groups"]
        for a in g["members"]
        for b in g["members"]
        if a != b
    }
    near = {frozenset((p["a"]["file"], p["b"]["file"])) for p in checks["near"]["listed"]}
    out = {}
    for kind, listed in (("copy", pairs), ("q70", near)):
        out[f"{kind}_listed"] = sum(
            1 for pair in listed for f in pair if f.endswith(f"_{kind}.jpg") and f.replace(f"_{kind}", "") in pair
        )
    return out


def run(
    quick: bool = False,
    threads: int = 1,
    repeats: int | None = None,
    images: int | None = None,
    cache: str | None = None,
) -> dict:
    import cnnpipe.stages.prepare as stage
    from cnnpipe.console import quiet_library_noise

    images = images or (2_000 if quick else IMAGES)
    repeats = repeats or 1
    pin_threads(threads)
    quiet_library_noise()
    base = Path(cache) if cache else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cnnpipe-bench"
    t0 = time.perf_counter()
    folder = make_folder(base / f"prepare-checks-{images}-{WIDTH}x{HEIGHT}", images)
    generate_s = time.perf_counter() - t0
    cfg = bench_config(["data=imagefolder", f"data.path={folder}", "model=timm", f"model.arch={ARCH}"])
    timed: dict[str, Any] = {}
    real = stage.run_checks

    def run_checks(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        checked = real(*args, **kwargs)
        timed["checks_s"] = time.perf_counter() - start
        timed["parts"] = checked.seconds
        return checked

    stage.run_checks = run_checks  # the real function, timed where the stage calls it
    samples: list[dict[str, Any]] = []
    load_before = os.getloadavg()[0]
    try:
        for i in range(repeats):
            with tempfile.TemporaryDirectory(prefix="cnnpipe-bench-prepare-") as tmp:
                start = time.perf_counter()
                meta = stage.prepare_splits(cfg, Path(tmp) / "prepared")
                total = time.perf_counter() - start
            rest = total - timed["checks_s"]
            samples.append({"total_s": total, "checks_s": timed["checks_s"], "rest_s": rest, **timed["parts"]})
            print(
                f"[{NAME}] repeat {i + 1}/{repeats}: prepare {total:.1f} s, of which checks {timed['checks_s']:.1f} s "
                f"({timed['checks_s'] / rest:.1%} of the rest)",
                flush=True,
            )
    finally:
        stage.run_checks = real
    load_after = os.getloadavg()[0]
    ratios = [s["checks_s"] / s["rest_s"] for s in samples]
    ratio = median(ratios)
    dup = meta["checks"]["duplicates"]
    found = planted_found(meta)
    rec = result(
        name=NAME,
        title="prepare's data checks (duplicates, class counts, source summary) vs the rest of prepare",
        what=f"prepare on {images:,} JPEGs {WIDTH}x{HEIGHT}, {CLASSES} classes, stored at "
        f"{meta['preprocess']['storage_size']} px (timm {ARCH}); checks timed inside the same run",
        ours=f"checks {median([s['checks_s'] for s in samples]):.1f} s",
        baseline=f"rest of prepare {median([s['rest_s'] for s in samples]):.1f} s",
        ratio=ratio,
        ratio_label="checks / rest of prepare",
        goal_op="<=",
        goal=GOAL,
        threads=threads,
        quick=quick,
        details={
            "images": images,
            "repeats": repeats,
            "prepare_total_s": spread([s["total_s"] for s in samples]),
            "checks_s": spread([s["checks_s"] for s in samples]),
            "rest_s": spread([s["rest_s"] for s in samples]),
            "phash_s": spread([s["phash_s"] for s in samples]),
            "exact_hash_s": spread([s["exact_s"] for s in samples]),
            "near_pairs_s": spread([s["near_pairs_s"] for s in samples]),
            "ratio_per_repeat": ratios,
            "exact_pairs": dup["exact"]["pairs"],
            "near_pairs": dup["near"]["pairs"],
            "planted_copy_pairs_listed": found["copy_listed"],
            "planted_q70_pairs_listed": found["q70_listed"],
            "planted_per_class": max(2, round(images // CLASSES * PLANTED)),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "load_avg_1m_before": round(load_before, 2),
            "load_avg_1m_after": round(load_after, 2),
            "generate_s": generate_s,
            "samples": samples,
        },
        notes=[
            "generate_s is the one-off generation of the folder (0 when the cache had it); not part of prepare",
            "the machine is shared: the 1-min load average before and after says how busy it was",
        ],
    )
    write_result(rec)
    return rec


def _options(parser: Any) -> None:
    parser.add_argument("--images", type=int, default=None, help=f"images in the folder (default {IMAGES:,})")
    parser.add_argument("--cache", default=None, help="where the generated folder is kept between runs")


def main(argv: list[str] | None = None) -> None:
    args = cli(__doc__, argv, _options)
    run(args.quick, args.threads, args.repeats, args.images, args.cache)


if __name__ == "__main__":
    main()
