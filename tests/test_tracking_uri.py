"""Where MLflow runs go: tracking URI precedence, the store of DVC's temporary experiment copies, secrets."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from cnnpipe.config import store_root
from cnnpipe.redact import mask_secrets
from cnnpipe.tracking.uri import ARTIFACTS_DIR, DB_NAME, artifact_location, resolve_tracking_uri


def sqlite_path(uri: str) -> Path:
    assert uri.startswith("sqlite:///")
    return Path(uri[len("sqlite:///") :])


def test_default_is_sqlite_at_the_project_root(tmp_path: Path) -> None:
    uri = resolve_tracking_uri(None, tmp_path)
    path = sqlite_path(uri)
    assert path.is_absolute()
    assert uri.startswith("sqlite:////")  # SQLAlchemy's form for an absolute path
    assert path == tmp_path.resolve() / DB_NAME


def test_default_is_absolute_for_a_relative_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "proj").mkdir()
    monkeypatch.chdir(tmp_path)
    path = sqlite_path(resolve_tracking_uri(None, Path("proj")))
    assert path.is_absolute()
    assert path == (tmp_path / "proj").resolve() / DB_NAME


def test_configured_uri_beats_the_default(tmp_path: Path) -> None:
    assert resolve_tracking_uri("http://mlflow.example:5000", tmp_path) == "http://mlflow.example:5000"
    assert resolve_tracking_uri("", tmp_path) == f"sqlite:///{tmp_path.resolve() / DB_NAME}"


def test_configured_beats_the_environment_which_beats_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An explicit tracking.uri is what the user asked for: $MLFLOW_TRACKING_URI is only the fallback."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://u:p@db/mlflow")
    assert resolve_tracking_uri("http://configured:5000", tmp_path) == "http://configured:5000"
    assert resolve_tracking_uri(None, tmp_path) == "postgresql://u:p@db/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # empty counts as unset
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / DB_NAME}"


def test_no_ambient_tracking_uri_in_tests(tmp_path: Path) -> None:
    assert resolve_tracking_uri(None, tmp_path).endswith(f"/{DB_NAME}")


@pytest.mark.parametrize("inner", ["xyz", "xyz/deeper/still", "tmpabc123"])
def test_store_root_of_a_dvc_experiment_copy_is_the_repo(tmp_path: Path, inner: str) -> None:
    repo = tmp_path / "repo"
    copy = repo / ".dvc" / "tmp" / "exps" / inner
    copy.mkdir(parents=True)
    assert store_root(copy) == repo.resolve()
    assert sqlite_path(resolve_tracking_uri(None, copy)) == repo.resolve() / DB_NAME


def test_store_root_of_an_ordinary_folder_is_itself(tmp_path: Path) -> None:
    assert store_root(tmp_path) == tmp_path.resolve()
    lookalike = tmp_path / "dvc" / "tmp" / "exps" / "x"  # no leading dot: not DVC's copy
    assert store_root(lookalike) == lookalike.resolve()
    partial = tmp_path / ".dvc" / "tmp" / "x"
    assert store_root(partial) == partial.resolve()


def test_mask_secrets_hides_passwords() -> None:
    assert mask_secrets("postgresql://user:pw@host/db") == "postgresql://user:***@host/db"
    masked = mask_secrets("postgresql+psycopg2://admin:s3cr:et@db.example.com:5432/mlflow?sslmode=require")
    assert "s3cr" not in masked and "et@" not in masked
    assert masked == "postgresql+psycopg2://admin:***@db.example.com:5432/mlflow?sslmode=require"
    assert mask_secrets("https://alice:token123@mlflow.example/") == "https://alice:***@mlflow.example/"


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:////abs/path/mlflow.db",
        "postgresql://user@host/db",
        "http://localhost:5000",
        "http://host:5000/path",
        "file:///tmp/mlruns",
        "databricks",
    ],
)
def test_mask_secrets_leaves_uris_without_a_password(uri: str) -> None:
    assert mask_secrets(uri) == uri


def test_mask_secrets_hides_a_password_with_no_user() -> None:
    assert "secret" not in mask_secrets("postgresql://:secret@host/db")


def test_artifact_location_is_an_absolute_file_uri_under_the_project(tmp_path: Path) -> None:
    uri = artifact_location(tmp_path, "cnnpipe-digits")
    parsed = urlparse(uri)
    assert parsed.scheme == "file"
    path = Path(unquote(parsed.path))
    assert path.is_absolute()
    assert path == tmp_path.resolve() / ARTIFACTS_DIR / "cnnpipe-digits"


def test_artifact_location_sanitises_the_name_and_follows_the_store(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    copy = repo / ".dvc" / "tmp" / "exps" / "abc"
    copy.mkdir(parents=True)
    path = Path(unquote(urlparse(artifact_location(copy, "my exp/../../etc")).path))
    assert path.parent == repo.resolve() / ARTIFACTS_DIR
    assert path.name == "my_exp_.._.._etc"
    assert path.is_relative_to(repo.resolve())
