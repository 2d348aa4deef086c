"""Property-based: random bytes and random config values never produce an unhandled exception —
only the documented user errors (ImageDecodeError / DataError / ConfigError) or a valid result."""

from __future__ import annotations

import contextlib
import gzip
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnpipe.config import as_dict, flatten, load_config, to_config
from cnnpipe.data.idx import read_idx
from cnnpipe.data.images import ImageDecodeError, decode_image
from cnnpipe.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "params.yaml").read_text())
KEYS = sorted(flatten(BASE))
PNG_HEAD = b"\x89PNG\r\n\x1a\n"
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.one_of(st.integers(-5, 300), st.floats(-2, 2), st.text(max_size=3)), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@FAST
@given(
    data=st.binary(max_size=600),
    prefix=st.sampled_from([b"", PNG_HEAD, b"GIF89a", b"BM", b"\xff\xd8\xff"]),
    channels=st.sampled_from([1, 3]),
)
def test_random_bytes_as_an_image_decode_or_raise_image_decode_error(
    tmp_path: Path, data: bytes, prefix: bytes, channels: int
) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(prefix + data)
    try:
        arr = decode_image(path, channels, 8)
    except ImageDecodeError:
        return
    assert arr.shape == (channels, 8, 8) and arr.dtype.name == "uint8"


@FAST
@given(data=st.binary(max_size=300), zipped=st.booleans())
def test_random_bytes_as_idx_read_or_raise_data_error(tmp_path: Path, data: bytes, zipped: bool) -> None:
    path = tmp_path / ("x.idx.gz" if zipped else "x.idx")
    path.write_bytes(gzip.compress(data) if zipped else data)
    with contextlib.suppress(DataError):
        read_idx(path)


@FAST
@given(key=st.sampled_from(KEYS), value=values)
def test_random_value_for_any_key_is_valid_or_a_config_error_naming_a_key(key: str, value: object) -> None:
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    try:
        cfg = to_config(raw)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert flatten(as_dict(cfg))  # a valid config round-trips


@FAST
@given(override=st.text(max_size=40))
def test_random_override_text_is_valid_or_a_config_error(override: str) -> None:
    try:
        load_config([override], root=ROOT)
    except ConfigError as exc:
        assert "\n" not in str(exc)
