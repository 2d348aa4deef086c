"""Everything MLflow: URI resolution, run lifecycle, tags, metrics, model logging. The only package
that imports mlflow."""
