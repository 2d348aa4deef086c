"""`model=timm`: any timm network (`model.arch`), pretrained or not, with a new classifier head for the data's classes.

timm does the work: the architecture, its pretrained config (mean/std, input size, interpolation, crop fraction:
data/preprocess.py), dropping the old head and adapting the first convolution to grey images (`in_chans`). This
module only decides where the weights come from, without ever waiting on a network it cannot reach:

1. `model.weights`: a .safetensors or .pth state dict, or a folder saved by timm (model.safetensors /
   pytorch_model.bin inside);
2. else the Hugging Face hub cache (`HF_HOME`), which needs no network once filled;
3. else, unless `HF_HUB_OFFLINE=1`, a download into that cache (bounded by the hub's timeouts).

Files are read by us, not by `torch.load` on pickles: safetensors as such, .pth/.bin with `weights_only=True`; the
state dict then goes to timm (`pretrained_cfg_overlay=dict(state_dict=...)`), which adapts head and input channels.
No source -> one ConfigError naming the model and the ways to supply weights (exit 2), before anything is written.
timm is imported inside the functions: importing `cnnpipe.models` costs nothing for the other families.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnpipe.config import ModelConfig
from cnnpipe.data.preprocess import pretrained_config
from cnnpipe.errors import ConfigError
from cnnpipe.models.layers import NORMALIZE_PREFIX, Normalize
from cnnpipe.models.registry import register_model

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in a hub repo or a folder saved by timm, in this order
WRAPPED = "net"  # TimmNet's attribute for the timm network: a cnnpipe models/model.safetensors names keys net.*
STATE_KEYS = ("state_dict", "model", "state_dict_ema")  # checkpoints that wrap the state dict (timm's train.py)
# The hub's network waits, bounded unless the user set them: a blocked network fails in seconds, never hangs.
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")


@dataclass(frozen=True)
class WeightsSource:
    path: Path  # the file the weights are read from
    origin: str  # for people: "model.weights", "hub cache timm/resnet18.a1_in1k", "hub download ..."


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _missing(arch: str, why: str) -> ConfigError:
    return ConfigError(
        f"model.arch={arch}: no pretrained weights ({why}); set model.weights=FILE (.safetensors / .pth, or a "
        f'folder saved by timm), fill the Hugging Face cache where the hub is reachable (`python -c "import timm; '
        f"timm.create_model('{arch}', pretrained=True)\"`, then copy $HF_HOME, default ~/.cache/huggingface), or set "
        "model.pretrained=false"
    )


def locate_weights(cfg: ModelConfig) -> WeightsSource:
    """Where `cfg`'s pretrained weights are, without reading them (`build_timm` reads them; the stages try them
    through `training.fit.check_pretrained_weights` before they write anything)."""
    arch = str(cfg.arch)
    if cfg.weights:
        path = Path(cfg.weights).expanduser()
        if path.is_dir():
            found = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
            if not found:
                raise ConfigError(f"model.weights: {path} holds neither {' nor '.join(WEIGHT_FILES)}")
            path = found[0]
        if not path.is_file():
            raise ConfigError(f"model.weights: {path} does not exist")
        return WeightsSource(path, f"model.weights {path}")
    pcfg = pretrained_config(arch)
    repo = getattr(pcfg, "hf_hub_id", None) if pcfg is not None else None
    if not repo:
        raise _missing(arch, "timm names no Hugging Face hub repository for it")
    from huggingface_hub import try_to_load_from_cache

    for name in WEIGHT_FILES:
        cached = try_to_load_from_cache(repo, name)
        if isinstance(cached, str):
            return WeightsSource(Path(cached), f"hub cache {repo}")
    if _hub_offline():
        raise _missing(arch, f"{repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    from huggingface_hub import hf_hub_download

    errors = []
    for name in WEIGHT_FILES:
        try:
            return WeightsSource(Path(hf_hub_download(repo, name)), f"hub download {repo}")
        except Exception as exc:  # no network, no such file, gated repository: try the next, then say so
            errors.append(f"{type(exc).__name__}")
    raise _missing(arch, f"{repo} is not cached and could not be downloaded: {', '.join(errors)}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a .pth / .bin read with `weights_only=True` (no arbitrary pickle)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's refusal of a pickled module is pages long, with terminal colours
        why = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
        raise ConfigError(
            f"model.weights: {path} is not a readable state dict ({type(exc).__name__}: {why[0][:200] if why else ''}"
            "); save `model.state_dict()` with safetensors or torch.save"
        ) from None
    for key in STATE_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.weights: {path} is not a state dict of tensors")
    if not state:  # timm would take an empty overlay for "none given" and go to the hub instead
        raise ConfigError(f"model.weights: {path} holds no tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if all(k.startswith((f"{WRAPPED}.", NORMALIZE_PREFIX)) for k in state):  # a model cnnpipe saved (TimmNet)
        state = {k.removeprefix(f"{WRAPPED}."): v for k, v in state.items() if not k.startswith(NORMALIZE_PREFIX)}
    return state


class TimmNet(nn.Module):
    """A timm network behind cnnpipe's Normalize layer (centre crop to the input size, then mean/std)."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float], size: int) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std, size=size)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def head_modules(self) -> list[nn.Module]:
        """The classifier(s) timm made for the data's classes: the new head (fine-tuning recipes, freezing)."""
        return classifiers(self.net)


def classifiers(net: nn.Module) -> list[nn.Module]:
    """timm's `get_classifier()`: one module, or a tuple of them for distilled networks (DeiT's head, head_dist)."""
    found = net.get_classifier()  # type: ignore[operator]
    heads = list(found) if isinstance(found, (tuple, list)) else [found]
    if not heads or not all(isinstance(h, nn.Module) for h in heads):
        raise TypeError(f"{type(net).__name__}.get_classifier() is not a module")
    return heads


@register_model("timm")
def build_timm(
    cfg: ModelConfig,
    *,
    in_shape: tuple[int, int, int],
    num_classes: int,
    mean: list[float],
    std: list[float],
    pretrained: bool = False,
) -> nn.Module:
    """conf/model/timm.yaml. With `pretrained` (and model.pretrained): the weights `locate_weights` finds, the old
    head dropped and the first convolution adapted to `in_shape`'s channels by timm."""
    import timm

    pcfg = pretrained_config(str(cfg.arch))  # an unknown name: one line
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_shape[0], "drop_rate": cfg.dropout}
    if pcfg is not None and pcfg.fixed_input_size and in_shape[-1] != pcfg.input_size[-1]:
        kwargs["img_size"] = in_shape[-1]  # a ViT's position embedding is resampled to the input size
    load = pretrained and cfg.pretrained  # the factory passes pretrained=True only when cfg.pretrained
    if load:
        kwargs["pretrained_cfg_overlay"] = {"state_dict": read_state_dict(locate_weights(cfg).path)}
    with _load_report() as report:
        try:
            net = timm.create_model(str(cfg.arch), pretrained=load, **kwargs)
        except RuntimeError as exc:  # a state dict of another architecture: shapes that differ
            lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
            why = next((line for line in lines if line.startswith(("size mismatch", "Missing", "Unexpected"))), "")
            raise ConfigError(
                f"model.weights: do not fit model.arch={cfg.arch} ({(why or lines[0] if lines else '')[:300]})"
            ) from None
    if load:
        kept = getattr(net, "pretrained_cfg", None)
        if isinstance(kept, dict):
            kept.pop("state_dict", None)  # timm keeps the overlay: a second copy of every weight
        _check_loaded(cfg, net, report)
    return TimmNet(net, mean, std, size=in_shape[-1])


@contextmanager
def _load_report() -> Iterator[list[str]]:
    """What timm says while loading pretrained weights. timm loads non-strictly whenever the head is replaced and
    only *logs* the keys it missed or did not expect: caught here, so weights of another architecture (a ViT's into
    a ResNet) are refused instead of leaving a random backbone behind a warning."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("timm.models._builder")
    handler, level, propagate = Collect(logging.INFO), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _check_loaded(cfg: ModelConfig, net: nn.Module, messages: list[str]) -> None:
    """Refuse weights that left tensors of the network unloaded (other than its new classifier) or held tensors
    it does not have. timm reports these only in its log (its wording, pinned by requirements.lock's timm, is
    checked by tests/test_timm_models.py, which fails if a timm upgrade rewords it)."""
    head_ids = {id(t) for head in classifiers(net) for t in [*head.parameters(), *head.buffers()]}
    head_keys = {k for k, t in net.state_dict(keep_vars=True).items() if id(t) in head_ids}
    for message in messages:
        found = re.match(r"(Missing|Unexpected) keys \((.*?)\) (?:discovered|found)", message)
        if not found:
            continue
        keys = [k for k in found.group(2).split(", ") if k and k not in head_keys]
        if keys:
            what = "missing from" if found.group(1) == "Missing" else "not in model.arch="
            where = "them" if found.group(1) == "Missing" else str(cfg.arch)
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise ConfigError(
                f"model.weights: do not fit model.arch={cfg.arch}: {len(keys)} tensor(s) {what} {where} ({shown}); "
                "to start from a cnnpipe model of another architecture, use model.init_from"
            )


def weights_origin(cfg: ModelConfig) -> str | None:
    """Where a run's pretrained weights come from (logged with the run), or None; fails like `locate_weights`."""
    return locate_weights(cfg).origin if cfg.pretrained else None
