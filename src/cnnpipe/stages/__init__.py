"""The five DVC stages (prepare -> augment -> sweep -> train -> evaluate), one module each, thin over the library
packages: load inputs, call library code, write outputs, talk to MLflow through `cnnpipe.tracking`. `runner` is
what every `pipelines/<stage>.py` shares. Nothing below imports this package."""
