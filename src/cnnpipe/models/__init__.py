"""CNN families and the factory that builds them from config + data shape.

Each family module registers its builders by name (models/registry.py) when imported; importing them here
means anything under `cnnpipe.models` sees every family, with no import to remember. A new family adds its
module to this line."""

from cnnpipe.models import cnn, resnet, timm_net  # noqa: F401  (each registers its builders)
