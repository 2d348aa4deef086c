"""The prediction log: one record per image a model answered, for the monitor to compare with the model's reference.

A record: time (UTC), model_run (the train run that made the model), model_version (the registry's, when the
caller knows it), class, probability, error, width and height as sent, brightness and contrast of the pixels the
network saw, the embedding summary (K numbers: the penultimate embedding on the reference's principal axes), and
image (a saved copy's path, only when asked for). Never the image itself unless asked.

Where it goes (`open_log`): a JSON-lines file (the default, `monitor/predictions.jsonl` in the project), appended
under an exclusive lock so that several server workers write whole lines; or a database given as an SQLAlchemy URL
(`postgresql://...`, `sqlite:///...`), one row per record in table `cnnpipe_predictions`, for a shared server."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from PIL import Image

from cnnpipe.errors import DataError
from cnnpipe.monitoring.features import Observed
from cnnpipe.redact import mask_secrets

LOG_ENV = "CNNPIPE_PREDICTION_LOG"  # where the pyfunc model (and `mlflow models serve`) logs; unset: no log
IMAGES_ENV = "CNNPIPE_PREDICTION_LOG_IMAGES"  # a folder to keep each image in (as the network saw it); unset: none
DEFAULT_LOG = Path("monitor") / "predictions.jsonl"  # predict.py's, under the project (git ignores monitor/)
TABLE = "cnnpipe_predictions"
FIELDS = (
    "time",
    "model_run",
    "model_version",
    "class",
    "probability",
    "error",
    "width",
    "height",
    "brightness",
    "contrast",
    "embedding",
    "image",
)


class PredictionLog(Protocol):
    where: str

    def append(self, records: Sequence[dict[str, Any]]) -> None: ...

    def read(self, model_run: str | None, last: int | None, since: str | None) -> list[dict[str, Any]]: ...


@contextmanager
def logging_off() -> Iterator[None]:
    """Models loaded inside log nothing: `CNNPIPE_PREDICTION_LOG` (and its images folder) unset meanwhile. For
    loads that are not serving: predict.py (which logs in its own process, or not at all with --no-log) and
    MLflow's check of a model as it is logged (it predicts the input example)."""
    saved = {key: os.environ.pop(key) for key in (LOG_ENV, IMAGES_ENV) if key in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def log_time(text: str) -> str:
    """An ISO 8601 time (UTC unless it says otherwise; `Z` accepted) as the log writes times: UTC, milliseconds,
    `+00:00`, so that comparing the strings compares the times."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise DataError(f"not an ISO 8601 time: {text!r} (e.g. 2026-12-07T09:00)") from None
    when = when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)
    return when.isoformat(timespec="milliseconds")


def records(
    frame: pd.DataFrame,
    seen: Observed,
    model_run: str | None,
    model_version: str | None = None,
    images_dir: Path | None = None,
    when: str | None = None,
) -> list[dict[str, Any]]:
    """One record per row of `frame` (the predictor's answer) with `seen` (what was measured on the same images).
    `images_dir`: keep a PNG of each image there, named by its pixels' sha256 (the same image is kept once)."""
    when = when or now()
    rows = []
    for i, rec in enumerate(frame.to_dict(orient="records")):
        failed = rec.get("error") is not None and not (isinstance(rec["error"], float) and np.isnan(rec["error"]))
        row: dict[str, Any] = {
            "time": when,
            "model_run": model_run,
            "model_version": model_version,
            "class": None if failed else str(rec["class"]),
            "probability": None if failed else round(float(rec["probability"]), 6),
            "error": str(rec["error"]) if failed else None,
            "width": int(seen.width[i]) or None,
            "height": int(seen.height[i]) or None,
            "brightness": None if failed else round(float(seen.brightness[i]), 6),
            "contrast": None if failed else round(float(seen.contrast[i]), 6),
            "embedding": None if failed or seen.embedding is None else [round(float(v), 5) for v in seen.embedding[i]],
            "image": None if failed or images_dir is None else str(_keep_image(seen.images[i], images_dir)),
        }
        rows.append(row)
    return rows


def _keep_image(pixels: np.ndarray, folder: Path) -> Path:
    """The uint8 (C, H, W) image as a PNG in `folder`, named by content; written once, atomically."""
    name = hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()[:24] + ".png"
    path = folder / name
    if not path.exists():
        from cnnpipe.atomic import atomic_path

        image = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
        with atomic_path(path) as tmp:
            Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")
    return path


def open_log(dest: str | os.PathLike[str], root: Path | None = None) -> PredictionLog:
    """`dest`: an SQLAlchemy database URL (has `://`), or a file path (relative ones under `root`, the project)."""
    text = os.fspath(dest)
    if "://" in text:
        return SqlLog(text)
    path = Path(text).expanduser()
    if not path.is_absolute() and root is not None:
        path = root / path
    return JsonlLog(path)


class JsonlLog:
    """A JSON-lines file: each append is one `write` of whole lines under `flock`, so concurrent writers (server
    workers, two predict runs) never interleave within a line."""

    def __init__(self, path: Path) -> None:
        self.path, self.where = path, str(path)

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        data = "".join(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n" for r in records).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            end = os.lseek(fd, 0, os.SEEK_END)
            if end and os.pread(fd, 1, end - 1) != b"\n":  # a writer died mid-line: end it, keep ours whole
                data = b"\n" + data
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)  # releases the lock

    def read(self, model_run: str | None, last: int | None, since: str | None) -> list[dict[str, Any]]:
        """The records of `model_run` (None: all), at or after `since` (ISO time), the `last` of them (None: all).
        A line that is not a whole record (a writer killed mid-write) is skipped."""
        if not self.path.is_file():
            raise DataError(f"{self.path}: no prediction log (log with predict.py, or serve with {LOG_ENV} set)")
        since = None if since is None else log_time(since)
        kept: deque[dict[str, Any]] = deque(maxlen=last)
        try:
            for record in self._lines():
                if model_run is not None and record.get("model_run") != model_run:
                    continue
                if since is not None and str(record.get("time", "")) < since:
                    continue
                kept.append(record)
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read the prediction log ({exc.strerror or exc})") from None
        return list(kept)

    def _lines(self) -> Iterator[dict[str, Any]]:
        with self.path.open("rb") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if isinstance(record, dict):
                    yield record


class SqlLog:
    """A table `cnnpipe_predictions` in any database SQLAlchemy reaches (created on first use)."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.where = mask_secrets(url)
        try:
            self.engine = sa.create_engine(url)
        except (sa.exc.ArgumentError, ImportError) as exc:
            raise DataError(f"prediction log {self.where}: not a database URL SQLAlchemy can open ({exc})") from None
        meta = sa.MetaData()
        self.table = sa.Table(
            TABLE,
            meta,
            sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
            sa.Column("time", sa.String(40), index=True),
            sa.Column("model_run", sa.String(64), index=True),
            sa.Column("model_version", sa.String(32)),
            sa.Column("class", sa.Text),
            sa.Column("probability", sa.Float),
            sa.Column("error", sa.Text),
            sa.Column("width", sa.Integer),
            sa.Column("height", sa.Integer),
            sa.Column("brightness", sa.Float),
            sa.Column("contrast", sa.Float),
            sa.Column("embedding", sa.Text),  # JSON list of K numbers
            sa.Column("image", sa.Text),
        )
        self._meta = meta
        self._ready = False

    def _ensure(self) -> None:
        import sqlalchemy as sa

        if self._ready:
            return
        try:
            self._meta.create_all(self.engine, checkfirst=True)
        except sa.exc.SQLAlchemyError as exc:
            raise DataError(f"prediction log {self.where}: {str(exc).splitlines()[0]}") from None
        self._ready = True

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        self._ensure()
        rows = [{**r, "embedding": None if r["embedding"] is None else json.dumps(r["embedding"])} for r in records]
        with self.engine.begin() as conn:
            conn.execute(self.table.insert(), rows)

    def read(self, model_run: str | None, last: int | None, since: str | None) -> list[dict[str, Any]]:
        """As `JsonlLog.read`. Reading never creates: a database or table that is not there is one line."""
        import sqlalchemy as sa

        url = self.engine.url
        if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).is_file():
            raise DataError(f"prediction log {self.where}: no such database file")
        try:
            if not sa.inspect(self.engine).has_table(TABLE):
                raise DataError(f"prediction log {self.where}: no table {TABLE} (nothing was logged there yet)")
            return self._select(model_run, last, None if since is None else log_time(since))
        except sa.exc.SQLAlchemyError as exc:
            raise DataError(f"prediction log {self.where}: {mask_secrets(str(exc).splitlines()[0])}") from None

    def _select(self, model_run: str | None, last: int | None, since: str | None) -> list[dict[str, Any]]:
        import sqlalchemy as sa

        query = sa.select(self.table).order_by(self.table.c.id.desc())
        if model_run is not None:
            query = query.where(self.table.c.model_run == model_run)
        if since is not None:
            query = query.where(self.table.c.time >= since)
        if last is not None:
            query = query.limit(last)
        with self.engine.connect() as conn:
            found = [dict(row._mapping) for row in conn.execute(query)]
        for row in found:
            row.pop("id", None)
            row["embedding"] = None if row["embedding"] is None else json.loads(row["embedding"])
        return found[::-1]


class PredictionLogger:
    """What a predicting process appends after each call: the model it is (the reference's run), where to, and
    whether to keep the images."""

    def __init__(
        self,
        log: PredictionLog,
        model_run: str | None,
        model_version: str | None = None,
        images_dir: Path | None = None,
    ) -> None:
        self.log, self.model_run, self.model_version, self.images_dir = log, model_run, model_version, images_dir

    def __call__(self, frame: pd.DataFrame, seen: Observed) -> str | None:
        """Append the records; a write that fails is returned as one line (None: written), for the caller to warn
        with: the answers themselves are already made and stand."""
        import sqlalchemy as sa

        try:
            self.log.append(records(frame, seen, self.model_run, self.model_version, self.images_dir))
        except (OSError, DataError, sa.exc.SQLAlchemyError, ValueError) as exc:
            text = mask_secrets(str(exc)).strip()
            return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        return None
