"""Passwords in tracking and storage URIs never printed, logged, tagged or written (issue #11 item 8)."""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

from cnnpipe.redact import mask_secrets
from tests.helpers import needs_postgres, prepared_copy, stage_env

SECRETS = ["hunter2", "p@ss", "pa/ss", "p:a:ss", "s3cr/et@x", "we?rd#pw", "sp ace", "ÿnïcödé", "%41dm1n"]

# Every URI form SQLAlchemy (Optuna storage, MLflow's database stores) and MLflow (http, databricks) accept, with
# {pw} where the password goes; a second value, {pw2}, where a form holds two.
FORMS = [
    "postgresql://user:{pw}@db.example.com:5432/mlflow",
    "postgresql+psycopg://user:{pw}@db.example.com/mlflow?sslmode=require",
    "postgresql+psycopg2://:{pw}@10.0.0.1/optuna",
    "postgresql://user@db.example.com/mlflow?password={pw}&sslmode=require",
    "postgresql://user@db.example.com/mlflow?sslmode=require&sslpassword={pw}",
    "mysql+pymysql://root:{pw}@127.0.0.1:3306/mlflow?charset=utf8mb4",
    "mysql://root@127.0.0.1/mlflow?passwd={pw}",
    "mssql+pyodbc://sa:{pw}@my_dsn",
    "mssql+pyodbc:///?odbc_connect=DRIVER%3D%7BODBC+Driver+18+for+SQL+Server%7D%3BSERVER%3Dhost%3BUID%3Dsa%3BPWD%3D{pw}",
    "mssql+pyodbc:///?odbc_connect=DRIVER={{ODBC Driver 18}};SERVER=host;UID=sa;Password={pw};Encrypt=yes",
    "oracle+oracledb://scott:{pw}@host:1521/?service_name=orcl",
    "https://alice:{pw}@mlflow.example.com/",
    "http://alice:{pw}@localhost:5000",
    "https://mlflow.example.com/api?token={pw}",
    "https://mlflow.example.com/?access_token={pw}&x=1",
    "postgresql://a:{pw}@h1/db and then mysql://b:{pw2}@h2/db",
    "'postgresql://a:{pw}@h1/db', \"https://u:{pw2}@h2\"",
    "connection to postgresql://a:{pw}@h1/db failed: (psycopg.OperationalError) timeout",
]


def encodings(secret: str) -> set[str]:
    """The password as it may appear in a URI: raw, percent-encoded (all or the usual way)."""
    return {secret, quote(secret, safe=""), quote(secret)}


@pytest.mark.parametrize(("form", "secret"), list(itertools.product(FORMS, SECRETS)))
def test_no_form_of_uri_lets_a_password_through(form: str, secret: str) -> None:
    embedded = form.count("://") > 1 or " " in form.replace("{{ODBC Driver 18}}", "")
    for pw in encodings(secret):
        if " " in pw and embedded:
            continue  # a raw space inside a longer text ends the URI (known limit); a whole-value URI may hold one
        text = form.format(pw=pw, pw2=pw[::-1] + "2")
        masked = mask_secrets(text)
        for shown in (pw, pw[::-1] + "2"):
            core = shown.strip()
            assert core not in masked, (text, masked)
        assert "***" in masked
        assert mask_secrets(masked) == masked  # idempotent


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://user:p%2Fw@db.example.com:5432/mlflow", "postgresql://user:***@db.example.com:5432/mlflow"),
        ("postgresql://user:p/w@db.example.com/mlflow", "postgresql://user:***@db.example.com/mlflow"),
        ("postgresql://user:p@ss@db.example.com/mlflow", "postgresql://user:***@db.example.com/mlflow"),
        ("postgresql://u@h/db?password=x&sslmode=require", "postgresql://u@h/db?password=***&sslmode=require"),
        ("in 'mysql://r:x@h/db'.", "in 'mysql://r:***@h/db'."),
        (
            "mssql+pyodbc:///?odbc_connect=DRIVER%3D%7BODBC+Driver+18%7D%3BSERVER%3Dh%3BUID%3Dsa%3BPWD%3Dx",
            "mssql+pyodbc:///?odbc_connect=DRIVER={ODBC+Driver+18};SERVER=h;UID=sa;PWD=***",
        ),
    ],
)
def test_the_rest_of_the_uri_stays_readable(text: str, expected: str) -> None:
    assert mask_secrets(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "sqlite:////abs/path/mlflow.db",
        "postgresql://user@host/db?sslmode=require",
        "https://mlflow.example.com/path?x=1#frag",
        "file:///tmp/mlruns",
        "databricks",
        "no uri here: user:pw@host",
        "s3://bucket/key@v2",
        "",
    ],
)
def test_text_without_a_secret_is_unchanged(text: str) -> None:
    assert mask_secrets(text) == text


@pytest.mark.slow
@needs_postgres
def test_a_sweep_on_a_password_bearing_postgresql_url_writes_the_password_nowhere(tmp_path: Path) -> None:
    """The server trusts local connections, so any password works: a raw `/` one, which the old masking leaked."""
    token = uuid.uuid4().hex[:12]  # made here, so no file of the project (this one included) holds it before
    secret = f"Zq8/{token}"
    project = prepared_copy(tmp_path / "project")
    name = f"secret-{uuid.uuid4().hex[:8]}"
    storage = f"postgresql+psycopg://postgres:{secret}@127.0.0.1:5432/postgres"
    proc = subprocess.run(
        [
            sys.executable,
            "pipelines/sweep.py",
            "augment=none",
            f"sweep.storage={storage}",
            f"sweep.study_name={name}",
            "sweep.n_trials=1",
            "sweep.space.epochs.low=1",
            "sweep.space.epochs.high=1",
            "trainer.threads=1",
        ],
        cwd=project,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    try:
        assert proc.returncode == 0, proc.stderr[-3000:]
        for fragment in (secret, token, quote(secret, safe="")):
            assert fragment not in proc.stderr and fragment not in proc.stdout
        assert "postgres:***@127.0.0.1" in proc.stderr  # said where the study is, masked
        leaks = [
            p.relative_to(project)
            for p in project.rglob("*")
            if p.is_file() and ".git" not in p.parts and token.encode() in p.read_bytes()
        ]
        assert leaks == []  # mlflow.db (params, tags), sweep/best_params.yaml, artifacts, journal: nowhere
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert runs
        for run in runs:
            values = [*run.data.params.values(), *run.data.tags.values()]
            assert not [v for v in values if token in v]
    finally:
        import optuna

        with contextlib.suppress(Exception):  # the study may not exist if the sweep failed early
            optuna.delete_study(study_name=name, storage="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
