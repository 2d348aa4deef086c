"""model=timm: pretrained weights from a file, a folder or the Hugging Face cache (offline), timm's new head and
grey adaptation, the preprocessing a timm network resolves, its config checks and its saved-model round trip.

Pretrained weights are made here: timm's tiny `test_*` architectures with seeded random weights (their own
1000-class head, BatchNorm statistics moved off their defaults), saved as a hub repository would hold them.
Nothing is downloaded: every hub lookup runs against a cache built in tmp_path, offline."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from cnnpipe.config import ModelConfig, as_dict, flatten, load_config
from cnnpipe.data.images import decode_image
from cnnpipe.data.preprocess import (
    Geometry,
    check_prepared,
    prepared_geometry,
    pretrained_config,
    resolve_geometry,
    resolve_normalisation,
)
from cnnpipe.errors import ConfigError, DataError
from cnnpipe.models.factory import build_model, model_spec
from cnnpipe.models.predictor import ImagePredictor
from cnnpipe.models.store import load_model, save_model
from cnnpipe.models.timm_net import TimmNet, locate_weights, weights_origin
from cnnpipe.models.transfer import backbone_modules, head_module, head_parameter_names
from tests.helpers import ROOT, png_bytes, stage_env
from tests.tiny import conf_section

ARCH = "test_resnet.r160_in1k"  # ImageNet-style timm network, 0.5 M parameters; bilinear, mean/std 0.5
OTHER = "test_efficientnet.r160_in1k"  # another architecture; bicubic, ImageNet's mean/std
CLASSES = ["cat", "dog", "eel"]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
HUB_FILE = "model.safetensors"


# ------------------------------------------------------------------------------------------------ helpers


pytestmark = pytest.mark.usefixtures("seeded_one_thread")  # one torch thread: tiny tensors, a busy machine


def model_cfg(name: str, **changes: object) -> ModelConfig:
    """The committed conf/model/<name>.yaml, with `changes`."""
    values = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())
    return conf_section("model", **{**values, **changes})


def timm_cfg(**changes: object) -> ModelConfig:
    """conf/model/timm.yaml on the tiny architecture (pretrained, weights from the hub cache unless set)."""
    return model_cfg("timm", **{"arch": ARCH, **changes})


def meta_for(channels: int = 3, geometry: Geometry | None = None) -> dict:
    """meta.json as prepare writes it for `geometry` (default: 32 px stored and fed as is)."""
    geometry = geometry or Geometry(32, 32, "bilinear", 1.0)
    side = geometry.storage_size
    return {
        "image_shape": [channels, side, side],
        "classes": list(CLASSES),
        "mean": [0.3] * channels,
        "std": [0.2] * channels,
        "preprocess": geometry.as_dict(),
    }


def spec_for(cfg: ModelConfig, channels: int = 3, geometry: Geometry | None = None) -> dict:
    return model_spec(cfg, meta_for(channels, geometry))


@functools.cache
def _pretrained(arch: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(sum(arch.encode()))
    import timm

    net = timm.create_model(arch, pretrained=False)
    with torch.no_grad():
        for name, buffer in net.named_buffers():  # not the defaults (0 and 1) a fresh network also has
            if name.endswith("running_mean"):
                buffer.uniform_(-0.1, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def pretrained_state(arch: str = ARCH) -> dict[str, torch.Tensor]:
    """`arch`'s "pretrained" weights: a timm network's state dict, its own 1000-class classifier included."""
    return {k: v.clone() for k, v in _pretrained(arch).items()}


def write_weights(path: Path, arch: str = ARCH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(pretrained_state(arch), str(path))
    return path


def classifier(arch: str) -> str:
    """The key prefix of `arch`'s classifier in its state dict (`fc.`, `classifier.`, `head.fc.`)."""
    return f"{pretrained_config(arch).classifier}."


def assert_pretrained(own: dict[str, torch.Tensor], arch: str = ARCH, first_conv: torch.Tensor | None = None) -> None:
    """`own` (a timm network's state dict) holds `arch`'s saved weights, bit for bit, everywhere but the classifier
    (and the first convolution when `first_conv` says what it must be instead); the classifier is a new one for
    CLASSES."""
    saved, head = pretrained_state(arch), classifier(arch)
    backbone = sorted(k for k in own if not k.startswith(head))
    assert backbone == sorted(k for k in saved if not k.startswith(head))
    conv = f"{pretrained_config(arch).first_conv}.weight"
    if first_conv is not None:
        assert torch.equal(own[conv], first_conv)
        backbone.remove(conv)
    assert [k for k in backbone if not torch.equal(own[k], saved[k])] == []
    old = saved[f"{head}weight"]
    assert tuple(old.shape) == (1000, old.shape[1])
    new = own[f"{head}weight"]
    assert tuple(new.shape) == (len(CLASSES), old.shape[1])
    assert not torch.equal(new, old[: len(CLASSES)])
    assert tuple(own[f"{head}bias"].shape) == (len(CLASSES),)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def fill_hub_cache(hub: Path, arch: str, weights: Path) -> Path:
    """A Hugging Face cache entry for `arch`'s timm repository as the hub client leaves it: refs/main naming a
    commit, the weights in snapshots/<commit>/. Checked with the client's own lookup."""
    from huggingface_hub import try_to_load_from_cache

    repo = pretrained_config(arch).hf_hub_id
    assert repo == f"timm/{arch}"
    folder = hub / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(arch.encode()).hexdigest()
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    shutil.copyfile(weights, snapshot / HUB_FILE)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    assert try_to_load_from_cache(repo, HUB_FILE, cache_dir=str(hub)) == str(snapshot / HUB_FILE)
    return snapshot / HUB_FILE


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Every test: an empty Hugging Face cache, HF_HUB_OFFLINE=1, and a cnnpipe download that fails the test if
    anything tries one. huggingface_hub reads HF_HOME / HF_HUB_OFFLINE into its constants when imported: the
    constants are patched. Nothing in this file may reach the network (here it has none: a lookup would wait)."""
    import huggingface_hub
    from huggingface_hub import constants

    home = tmp_path / "hf"
    (home / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_download(*args: object, **kwargs: object) -> str:
        raise AssertionError(f"a hub download was attempted: {args}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    return home / "hub"


# ------------------------------------------------------------------- 1-3: model.weights, head, input channels


def test_weights_file_gives_the_backbone_bit_for_bit_and_a_new_head(tmp_path: Path, offline_hub: Path) -> None:
    weights = write_weights(tmp_path / "resnet.safetensors")
    spec = spec_for(timm_cfg(weights=str(weights)))
    net = build_model(spec, pretrained=True)
    assert isinstance(net, TimmNet)
    assert_pretrained(net.net.state_dict())
    assert net.net.get_classifier().out_features == len(CLASSES)
    # the network's own normalisation: test_resnet's pretrained config (0.5 / 0.5), not the data's (0.3 / 0.2)
    assert net.normalize.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    assert net.normalize.std.flatten().tolist() == [0.5, 0.5, 0.5]
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, len(CLASSES))

    # Without pretrained (a saved model rebuilt, or model.pretrained=false) nothing is read: random weights.
    conv = "conv1.0.weight"
    assert not torch.equal(build_model(spec).net.state_dict()[conv], pretrained_state()[conv])
    unloaded = build_model(spec_for(timm_cfg(pretrained=False)), pretrained=True)  # nothing cached: no lookup
    assert not torch.equal(unloaded.net.state_dict()[conv], pretrained_state()[conv])
    assert files_under(offline_hub) == []


def test_a_model_cnnpipe_saved_is_pretrained_weights_for_the_same_architecture(
    tmp_path: Path, offline_hub: Path
) -> None:
    """models/model.safetensors of a cnnpipe timm model (keys net.*, normalize.*) as model.weights for new classes:
    its backbone arrives bit for bit, the head and the normalisation are the new model's own."""
    first = build_model(spec_for(timm_cfg(weights=str(write_weights(tmp_path / "resnet.safetensors")))), True)
    with torch.no_grad():
        for p in first.net.parameters():
            p.add_(0.01)  # a backbone unlike the pretrained file's: "trained by cnnpipe"
    folder = tmp_path / "models"
    save_model(folder, first, spec_for(timm_cfg()))
    spec = spec_for(timm_cfg(weights=str(folder)))
    spec["classes"] = ["a", "b", "c", "d", "e"]
    second = build_model(spec, pretrained=True)
    head = classifier(ARCH)
    trained = {k: v for k, v in first.net.state_dict().items() if not k.startswith(head)}
    got = second.net.state_dict()
    assert [k for k, v in trained.items() if not torch.equal(got[k], v)] == []
    assert second.net.get_classifier().out_features == 5
    assert second.normalize.mean.flatten().tolist() == [0.5, 0.5, 0.5]


def write_format(kind: str, folder: Path) -> Path:
    """`pretrained_state()` saved the ways model.weights accepts; returns what model.weights names."""
    state = pretrained_state()
    if kind == "safetensors":
        return write_weights(folder / "weights.safetensors")
    if kind == "pth":
        torch.save(state, folder / "weights.pth")
        return folder / "weights.pth"
    if kind == "pth_state_dict":  # a training checkpoint wrapping it (timm's train.py)
        torch.save({"state_dict": state, "epoch": 7}, folder / "checkpoint.pth.tar")
        return folder / "checkpoint.pth.tar"
    if kind == "pth_ddp":  # saved from DistributedDataParallel: every key under module.
        torch.save({f"module.{k}": v for k, v in state.items()}, folder / "ddp.pth")
        return folder / "ddp.pth"
    if kind == "folder_safetensors":
        write_weights(folder / "saved" / "model.safetensors")
        return folder / "saved"
    if kind == "folder_bin":
        (folder / "saved").mkdir()
        torch.save(state, folder / "saved" / "pytorch_model.bin")
        return folder / "saved"
    if kind == "folder_both":  # model.safetensors first: the .bin here is not even readable
        write_weights(folder / "saved" / "model.safetensors")
        (folder / "saved" / "pytorch_model.bin").write_bytes(b"not a state dict")
        return folder / "saved"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["safetensors", "pth", "pth_state_dict", "pth_ddp", "folder_safetensors", "folder_bin", "folder_both"],
)
def test_weights_in_every_accepted_form(kind: str, tmp_path: Path, offline_hub: Path) -> None:
    weights = write_format(kind, tmp_path)
    cfg = timm_cfg(weights=str(weights))
    source = locate_weights(cfg)
    inside = {
        "folder_safetensors": "model.safetensors",
        "folder_bin": "pytorch_model.bin",
        "folder_both": "model.safetensors",
    }
    assert source.path == (weights / inside[kind] if kind in inside else weights)
    assert source.origin == f"model.weights {source.path}"
    assert weights_origin(cfg) == source.origin
    assert_pretrained(build_model(spec_for(cfg), pretrained=True).net.state_dict())


def write_bad(kind: str, folder: Path) -> tuple[Path, str]:
    """A model.weights that holds no usable state dict, and what its error must say."""
    if kind == "empty_folder":
        (folder / "saved").mkdir()
        return folder / "saved", "holds neither model.safetensors nor pytorch_model.bin"
    if kind == "missing":
        return folder / "nowhere" / "weights.safetensors", "does not exist"
    if kind == "text_safetensors":
        (folder / "w.safetensors").write_text("not weights")
        return folder / "w.safetensors", "is not a readable state dict"
    if kind == "text_pth":
        (folder / "w.pth").write_text("not weights")
        return folder / "w.pth", "is not a readable state dict"
    if kind == "pickled_module":  # torch.save(model) instead of torch.save(model.state_dict()): not unpickled
        torch.save(torch.nn.Linear(2, 2), folder / "model.pth")
        return folder / "model.pth", "is not a readable state dict"
    if kind == "list_of_tensors":
        torch.save([torch.zeros(2)], folder / "list.pth")
        return folder / "list.pth", "is not a state dict of tensors"
    if kind == "dict_of_numbers":
        torch.save({"lr": 0.1, "epoch": 3}, folder / "numbers.pth")
        return folder / "numbers.pth", "is not a state dict of tensors"
    raise AssertionError(kind)


BAD = [
    "empty_folder",
    "missing",
    "text_safetensors",
    "text_pth",
    "pickled_module",
    "list_of_tensors",
    "dict_of_numbers",
]


@pytest.mark.parametrize("kind", BAD)
def test_unusable_weights_are_a_config_error_naming_model_weights(kind: str, tmp_path: Path) -> None:
    weights, says = write_bad(kind, tmp_path)
    spec = spec_for(timm_cfg(weights=str(weights)))
    with pytest.raises(ConfigError) as caught:
        build_model(spec, pretrained=True)
    message = str(caught.value)
    assert message.startswith(f"model.weights: {weights} "), message
    assert says in message


@pytest.mark.parametrize("kind", BAD)
def test_unusable_weights_error_is_one_line(kind: str, tmp_path: Path) -> None:
    weights, _ = write_bad(kind, tmp_path)
    with pytest.raises(ConfigError) as caught:
        build_model(spec_for(timm_cfg(weights=str(weights))), pretrained=True)
    message = str(caught.value)
    assert "\n" not in message and "\x1b" not in message, message
    assert len(message.replace(str(weights), "<file>")) < 350, message  # short, whatever pytest's tmp path


@pytest.mark.parametrize("arch", [ARCH, OTHER])
def test_grey_data_gets_the_rgb_first_convolution_summed(arch: str, tmp_path: Path) -> None:
    """in_chans=1: timm adapts the first convolution by summing its RGB kernels (a grey image is R = G = B);
    everything else is the saved weights unchanged. 3 channels: the first convolution as saved."""
    weights = write_weights(tmp_path / "w.safetensors", arch)
    conv = f"{pretrained_config(arch).first_conv}.weight"
    rgb = pretrained_state(arch)[conv]
    assert rgb.shape[1] == 3

    grey = build_model(spec_for(timm_cfg(arch=arch, weights=str(weights)), channels=1), pretrained=True)
    summed = rgb.sum(dim=1, keepdim=True)
    assert grey.net.state_dict()[conv].shape == (rgb.shape[0], 1, *rgb.shape[2:])
    assert_pretrained(grey.net.state_dict(), arch, first_conv=summed)
    assert not torch.equal(summed, rgb[:, :1])  # a sum, not the red kernel alone
    assert grey(torch.rand(2, 1, 32, 32)).shape == (2, len(CLASSES))
    # the network's RGB normalisation averaged to one value for grey data
    mean, std = pretrained_config(arch).mean, pretrained_config(arch).std
    assert grey.normalize.mean.flatten().tolist() == pytest.approx([sum(mean) / 3])
    assert grey.normalize.std.flatten().tolist() == pytest.approx([sum(std) / 3])

    colour = build_model(spec_for(timm_cfg(arch=arch, weights=str(weights)), channels=3), pretrained=True)
    assert torch.equal(colour.net.state_dict()[conv], rgb)
    assert_pretrained(colour.net.state_dict(), arch)


# ------------------------------------------------------------------------------- 4: the hub cache, offline


HUB_SCRIPT = r"""
import json, sys, time
from huggingface_hub import constants
from safetensors.torch import save_file
from cnnpipe.config import ModelConfig
from cnnpipe.errors import ConfigError
from cnnpipe.models.factory import build_model
from cnnpipe.models.timm_net import weights_origin

report = {"cache": constants.HF_HUB_CACHE, "offline": bool(constants.HF_HUB_OFFLINE), "runs": []}
for spec, out in json.loads(sys.argv[1]):
    start = time.monotonic()
    try:
        net = build_model(spec, pretrained=True)
        origin = weights_origin(ModelConfig(**spec["model"]))
    except ConfigError as exc:
        report["runs"].append({"error": str(exc), "seconds": time.monotonic() - start})
        continue
    save_file({k: v.contiguous() for k, v in net.net.state_dict().items()}, out)
    report["runs"].append({"origin": origin, "seconds": time.monotonic() - start})
print(json.dumps(report))
"""


def test_hub_cache_offline_in_a_fresh_process(tmp_path: Path) -> None:
    """HF_HOME and HF_HUB_OFFLINE=1 set in the environment of a new process, as a user sets them: the cached
    architecture loads from the cache intact with a new head; an uncached one is one line at once, nothing
    written."""
    home = tmp_path / "fresh-hf"
    fill_hub_cache(home / "hub", ARCH, write_weights(tmp_path / "made" / "w.safetensors"))
    before = files_under(home)
    jobs = [
        (spec_for(timm_cfg()), str(tmp_path / "cached.safetensors")),
        (spec_for(timm_cfg(arch=OTHER)), str(tmp_path / "uncached.safetensors")),
    ]
    drop = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_DISABLE_OFFLINE", "HF_ENDPOINT")
    env = {k: v for k, v in stage_env().items() if k not in drop}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, json.dumps(jobs)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["cache"] == str(home / "hub")
    assert report["offline"] is True
    cached, uncached = report["runs"]

    assert cached.get("origin") == f"hub cache timm/{ARCH}", cached
    assert_pretrained(load_file(jobs[0][1]))

    message = uncached.get("error", "")
    assert message.startswith(f"model.arch={OTHER}: no pretrained weights"), uncached
    for part in ("HF_HUB_OFFLINE", "model.weights=", "model.pretrained=false", f"timm.create_model('{OTHER}'"):
        assert part in message, message
    assert "\n" not in message
    assert uncached["seconds"] < 10
    assert not Path(jobs[1][1]).exists()
    assert files_under(home) == before  # the lookups wrote nothing into the cache


def test_no_weights_offline_is_one_line_before_anything_is_written(offline_hub: Path, tmp_path: Path) -> None:
    cfg = timm_cfg()
    start = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        locate_weights(cfg)
    assert time.monotonic() - start < 10
    message = str(caught.value)
    assert message.startswith(f"model.arch={ARCH}: no pretrained weights (timm/{ARCH} is not in the Hugging Face cache")
    assert "model.weights=FILE" in message and "model.pretrained=false" in message and "\n" not in message
    # fit and the train stage meet the same line, from the same place
    with pytest.raises(ConfigError) as by_origin:
        weights_origin(cfg)
    with pytest.raises(ConfigError) as by_build:
        build_model(spec_for(cfg), pretrained=True)
    assert str(by_origin.value) == str(by_build.value) == message
    assert files_under(tmp_path) == []  # nothing written: not into the cache, not anywhere
    assert weights_origin(timm_cfg(pretrained=False)) is None


def test_a_failed_download_is_one_line_naming_why(offline_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    tried: list[str] = []

    def unreachable(repo: str, filename: str, **kwargs: object) -> str:
        tried.append(f"{repo}/{filename}")
        raise OSError("network is unreachable")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(ConfigError) as caught:
        locate_weights(timm_cfg())
    assert tried == [f"timm/{ARCH}/model.safetensors", f"timm/{ARCH}/pytorch_model.bin"]
    assert f"timm/{ARCH} is not cached and could not be downloaded: OSError, OSError" in str(caught.value)
    assert "model.pretrained=false" in str(caught.value)


def test_model_weights_win_over_the_cache(offline_hub: Path, tmp_path: Path) -> None:
    cached = fill_hub_cache(offline_hub, ARCH, write_weights(tmp_path / "made" / "w.safetensors"))
    from_cache = locate_weights(timm_cfg())
    assert (from_cache.path, from_cache.origin) == (cached, f"hub cache timm/{ARCH}")
    assert_pretrained(build_model(spec_for(timm_cfg()), pretrained=True).net.state_dict())

    own = tmp_path / "mine.safetensors"
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in pretrained_state().items()}, str(own))
    assert locate_weights(timm_cfg(weights=str(own))).path == own
    net = build_model(spec_for(timm_cfg(weights=str(own))), pretrained=True)
    conv = "conv1.0.weight"
    assert torch.equal(net.net.state_dict()[conv], pretrained_state()[conv] + 1)


# ---------------------------------------------------------------------- 5-6: weights and names that do not fit


def test_weights_of_another_architecture_do_not_fit(tmp_path: Path) -> None:
    weights = write_weights(tmp_path / "efficientnet.safetensors", OTHER)
    with pytest.raises(ConfigError) as caught:
        build_model(spec_for(timm_cfg(weights=str(weights))), pretrained=True)
    message = str(caught.value)
    assert message.startswith(f"model.weights: do not fit model.arch={ARCH} ("), message
    assert "\n" not in message and len(message.replace(str(weights), "<file>")) < 400


NON_STRICT = (
    "timm loads pretrained weights with strict=False whenever the class count differs from 1000 "
    "(timm/models/_builder.py load_pretrained), so build_timm (src/cnnpipe/models/timm_net.py) gets no "
    "RuntimeError for weights that share no or only some tensors with model.arch: a random backbone, silently"
)


def partial_resnet() -> dict[str, torch.Tensor]:
    return {k: v for k, v in pretrained_state(ARCH).items() if not k.startswith("layer4.")}


@pytest.mark.parametrize("source", ["test_vit.r160_in1k", "test_convnext.r160_in1k", "no_layer4"])
def test_weights_missing_backbone_tensors_do_not_fit(source: str, tmp_path: Path) -> None:
    """Every backbone tensor must come from model.weights: a file without some of them is not those weights."""
    weights = tmp_path / "w.safetensors"
    if source == "no_layer4":
        save_file(partial_resnet(), str(weights))
    else:
        write_weights(weights, source)
    with pytest.raises(ConfigError, match=rf"^model\.weights: do not fit model\.arch={ARCH}"):
        build_model(spec_for(timm_cfg(weights=str(weights))), pretrained=True)


def test_an_empty_weights_file_is_refused_not_replaced_by_the_hub(tmp_path: Path) -> None:
    weights = tmp_path / "empty.safetensors"
    save_file({}, str(weights))
    with pytest.raises(ConfigError, match=rf"^model\.weights: {re.escape(str(weights))} "):
        build_model(spec_for(timm_cfg(weights=str(weights))), pretrained=True)


@pytest.mark.parametrize("use", ["spec", "build", "geometry"])
def test_unknown_arch_names_model_arch_with_a_suggestion(use: str) -> None:
    cfg = timm_cfg(arch="resnet5O", pretrained=False)
    with pytest.raises(ConfigError) as caught:
        if use == "spec":  # the spec's normalisation comes from the architecture's pretrained config
            model_spec(cfg, meta_for())
        elif use == "build":  # a model.json naming an architecture this timm does not have
            spec = spec_for(timm_cfg(pretrained=False))
            build_model({**spec, "model": {**spec["model"], "arch": "resnet5O"}})
        else:  # prepare
            resolve_geometry(conf_section("data", image_size=None), cfg)
    message = str(caught.value)
    assert message.startswith("model.arch must be a timm model name, got 'resnet5O'; did you mean resnet50"), message
    assert "\n" not in message


def test_unknown_name_without_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"^model\.arch must be a timm model name, got 'zzqx_net'; see timm"):
        pretrained_config("zzqx_net")


def test_unknown_pretrained_tag_names_model_arch() -> None:
    with pytest.raises(ConfigError, match=r"^model\.arch: timm has 'test_resnet' but no pretrained tag"):
        pretrained_config("test_resnet.no_such_tag")


# ------------------------------------------------------------------------------- 7: preprocessing resolution


def test_timm_geometry_is_the_pretrained_config_unless_set() -> None:
    data = conf_section("data", image_size=None, channels=3)
    pcfg = pretrained_config(ARCH)
    assert (pcfg.input_size[-1], pcfg.crop_pct, pcfg.interpolation) == (160, 0.95, "bilinear")
    assert resolve_geometry(data, timm_cfg()) == Geometry(160, 168, "bilinear", 0.95)  # floor(160 / 0.95)
    assert resolve_geometry(data, timm_cfg(arch=OTHER)) == Geometry(160, 168, "bicubic", 0.95)
    assert resolve_geometry(data, timm_cfg(arch="test_resnet")) == Geometry(160, 168, "bilinear", 0.95)  # no tag
    # what the user sets wins, key by key; storage follows floor(input / crop)
    sized = conf_section("data", image_size=64, channels=3)
    assert resolve_geometry(sized, timm_cfg()) == Geometry(64, 67, "bilinear", 0.95)
    assert resolve_geometry(data, timm_cfg(crop_pct=0.8)) == Geometry(160, 200, "bilinear", 0.8)
    assert resolve_geometry(data, timm_cfg(interpolation="nearest")) == Geometry(160, 168, "nearest", 0.95)
    assert resolve_geometry(sized, timm_cfg(crop_pct=0.875, interpolation="bicubic")) == Geometry(
        64, 73, "bicubic", 0.875
    )
    assert resolve_geometry(data, timm_cfg(crop_pct=1.0)) == Geometry(160, 160, "bilinear", 1.0)


def test_own_families_geometry() -> None:
    for name in ("cnn", "resnet_small"):
        cfg = model_cfg(name)
        assert resolve_geometry(conf_section("data", image_size=None), cfg) == Geometry(32, 32, "bilinear", 1.0)
        assert resolve_geometry(conf_section("data", image_size=8), cfg) == Geometry(8, 8, "bilinear", 1.0)
        assert resolve_geometry(
            conf_section("data", image_size=28), model_cfg(name, interpolation="bicubic")
        ) == Geometry(28, 28, "bicubic", 1.0)


def test_normalisation_sources() -> None:
    meta = {"mean": [0.11, 0.22, 0.33], "std": [0.3, 0.4, 0.5]}
    grey_meta = {"mean": [0.11], "std": [0.3]}
    # a timm network: its pretrained config's, averaged over RGB for grey data
    assert resolve_normalisation(timm_cfg(arch=OTHER), 3, meta) == (
        pytest.approx(IMAGENET_MEAN),
        pytest.approx(IMAGENET_STD),
    )
    assert resolve_normalisation(timm_cfg(arch=OTHER), 1, grey_meta) == (
        pytest.approx([sum(IMAGENET_MEAN) / 3]),
        pytest.approx([sum(IMAGENET_STD) / 3]),
    )
    assert resolve_normalisation(timm_cfg(), 3, meta) == ([0.5] * 3, [0.5] * 3)
    # cnnpipe's own: the training split's (meta.json)
    assert resolve_normalisation(model_cfg("cnn"), 3, meta) == ([0.11, 0.22, 0.33], [0.3, 0.4, 0.5])
    assert resolve_normalisation(model_cfg("cnn"), 1, grey_meta) == ([0.11], [0.3])
    # model.mean / model.std win for every family
    own = {"mean": [0.2, 0.3, 0.4], "std": [0.6, 0.7, 0.8]}
    assert resolve_normalisation(timm_cfg(arch=OTHER, **own), 3, meta) == (own["mean"], own["std"])
    assert resolve_normalisation(model_cfg("cnn", **own), 3, meta) == (own["mean"], own["std"])
    # and travel in the spec, into the model's Normalize layer
    spec = spec_for(timm_cfg(arch=OTHER, **own))
    assert (spec["mean"], spec["std"]) == (own["mean"], own["std"])
    net = build_model(spec)
    assert net.normalize.mean.flatten().tolist() == pytest.approx(own["mean"])


def prepared_config(*overrides: str):
    return load_config(
        ["train.hparams=params", "model=timm", f"model.arch={ARCH}", "data.image_size=null", *overrides], root=ROOT
    )


def test_check_prepared_refuses_a_set_value_that_differs() -> None:
    stored = Geometry(160, 168, "bilinear", 0.95)
    meta = meta_for(geometry=stored)
    assert check_prepared(prepared_config(), meta, "data/prepared/meta.json") == stored  # nulls take prepare's
    for same in ("data.image_size=160", "model.crop_pct=0.95", "model.interpolation=bilinear"):
        assert check_prepared(prepared_config(same), meta, "meta.json") == stored
    for override, key, value in (
        ("data.image_size=64", "data.image_size", "64"),
        ("model.crop_pct=0.875", "model.crop_pct", "0.875"),
        ("model.interpolation=bicubic", "model.interpolation", "'bicubic'"),
    ):
        with pytest.raises(DataError) as caught:
            check_prepared(prepared_config(override), meta, "data/prepared/meta.json")
        message = str(caught.value)
        assert message.startswith(f"data/prepared/meta.json: prepared with {key}="), message
        assert f"the config sets {value}" in message and "dvc repro prepare" in message
    # meta.json written before the geometry was recorded: square as stored, no crop
    old = {k: v for k, v in meta_for(geometry=Geometry(28, 28, "bilinear", 1.0)).items() if k != "preprocess"}
    assert prepared_geometry(old) == Geometry(28, 28, "bilinear", 1.0)
    with pytest.raises(DataError, match=r"prepared with data\.image_size=28,"):
        check_prepared(prepared_config("data.image_size=32"), old, "meta.json")


# --------------------------------------------------------------------- 8-9: saved model, crop, predictor


CROPPED = Geometry(32, 36, "bicubic", 0.875)  # floor(32 / 0.875) = 36: stored at 36 px, fed 32 px crops


def trained_looking(tmp_path: Path) -> tuple[torch.nn.Module, dict]:
    """A pretrained timm model on 36-px stored images, BatchNorm statistics updated by one training batch."""
    weights = write_weights(tmp_path / "weights" / "w.safetensors")
    spec = spec_for(timm_cfg(weights=str(weights)), geometry=CROPPED)
    net = build_model(spec, pretrained=True)
    net.train()
    with torch.no_grad():
        net(torch.rand(4, 3, 32, 32))
        logits = net.eval()(torch.rand(2, 3, 36, 36))
    assert (logits[0] - logits[1]).abs().max() > 1e-3  # its answer depends on the image: comparisons mean something
    return net, spec


def test_saved_model_rebuilds_without_pretrained_weights(tmp_path: Path, offline_hub: Path) -> None:
    net, spec = trained_looking(tmp_path)
    assert spec["in_shape"] == [3, 36, 36]  # as prepare stored the images
    assert (spec["input_size"], spec["interpolation"], spec["crop_pct"]) == (32, "bicubic", 0.875)
    assert spec["model"]["arch"] == ARCH and spec["model"]["pretrained"] is True
    x = torch.rand(3, 3, 36, 36)
    with torch.no_grad():
        expected = net(x)
    save_model(tmp_path / "models", net, spec)
    shutil.rmtree(tmp_path / "weights")  # model.weights gone, the cache empty, the hub offline
    with pytest.raises(ConfigError):
        build_model(spec, pretrained=True)  # the pretrained weights really are out of reach now

    loaded, loaded_spec = load_model(tmp_path / "models")
    assert loaded_spec == spec
    assert isinstance(loaded, TimmNet) and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert files_under(offline_hub) == []


def test_normalize_crops_the_stored_images_to_the_input_size(tmp_path: Path) -> None:
    net, _ = trained_looking(tmp_path)
    assert net.normalize.size == 32
    x = torch.rand(2, 3, 36, 36)
    with torch.no_grad():
        full, centre, corner = net(x), net(x[..., 2:34, 2:34].contiguous()), net(x[..., :32, :32].contiguous())
    assert torch.allclose(full, centre, atol=1e-6, rtol=0)
    assert not torch.allclose(full, corner, atol=1e-4, rtol=0)  # the crop is the centre one, not any


def test_predictor_decodes_the_central_square_with_the_spec_interpolation(tmp_path: Path) -> None:
    net, spec = trained_looking(tmp_path)
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)  # wider than high: a 40 x 40 central square
    pixels[:, :10] = 255  # the sides the central square leaves out: white
    pixels[:, 50:] = 0
    data = png_bytes(pixels)

    predictor = ImagePredictor(net, spec)
    frame = predictor.predict([data])
    assert frame["error"].tolist() == [None]
    got = frame[[f"prob_{c}" for c in CLASSES]].to_numpy(dtype=np.float64)

    decoded = decode_image(io.BytesIO(data), 3, 36, "bicubic")
    assert decoded.shape == (3, 36, 36)
    np.testing.assert_allclose(got, predictor.probabilities(decoded[None]), rtol=0, atol=1e-7)
    # and not what another interpolation, or the whole image squeezed square, would have given
    bilinear = decode_image(io.BytesIO(data), 3, 36, "bilinear")
    squeezed = np.asarray(Image.fromarray(pixels).resize((36, 36), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    for other in (bilinear, squeezed):
        assert not np.array_equal(other, decoded)
        assert np.abs(predictor.probabilities(other[None]) - got).max() > 1e-6


# ---------------------------------------------------------------------- head / backbone of a timm network


@pytest.mark.parametrize("arch", [ARCH, "test_convnext.r160_in1k"])
def test_head_and_backbone_split_every_parameter(arch: str) -> None:
    """The new classifier is the head (full lr, never frozen); every other parameter is in a backbone module
    (frozen during model.freeze_epochs), even when the classifier is nested (ConvNeXt's head.fc)."""
    net = build_model(spec_for(timm_cfg(arch=arch, pretrained=False)))
    head = head_module(net)
    assert head is net.net.get_classifier()
    assert isinstance(head, torch.nn.Linear) and head.out_features == len(CLASSES)
    prefix = f"net.{classifier(arch)}"
    assert head_parameter_names(net) == {f"{prefix}weight", f"{prefix}bias"}
    modules = backbone_modules(net)
    assert net.normalize not in modules and all(head is not m for b in modules for m in b.modules())
    in_backbone = [id(p) for b in modules for p in b.parameters()]
    assert len(in_backbone) == len(set(in_backbone))  # no parameter twice
    everything = {id(p) for p in net.parameters()}
    assert set(in_backbone) | {id(p) for p in head.parameters()} == everything
    assert set(in_backbone).isdisjoint(id(p) for p in head.parameters())


PRETRAINED_CFG_COPY = (
    "build_timm passes the state dict through pretrained_cfg_overlay, and timm keeps it in net.pretrained_cfg: "
    "the model holds a second full copy of the pretrained weights for its lifetime (and deepcopy, e.g. the EMA "
    "model, copies it again)"
)


def test_built_model_keeps_no_copy_of_the_pretrained_state_dict(tmp_path: Path) -> None:
    weights = write_weights(tmp_path / "w.safetensors")
    net = build_model(spec_for(timm_cfg(weights=str(weights))), pretrained=True)
    assert net.net.pretrained_cfg.get("state_dict") is None


def test_fixed_size_network_takes_the_configured_input_size() -> None:
    arch = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert pretrained_config(arch).fixed_input_size
    try:
        net = build_model(spec_for(timm_cfg(arch=arch, pretrained=False))).eval()
    except ConfigError as exc:  # refusing the size up front, naming it, would be as good
        assert "data.image_size" in str(exc)
        return
    with torch.no_grad():
        assert net(torch.rand(1, 3, 32, 32)).shape == (1, len(CLASSES))


# --------------------------------------------------------------------------------------- 10: config checks


def config(*overrides: str):
    return load_config(["train.hparams=params", *overrides], root=ROOT)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model=cnn", "model.arch=resnet18"], "model.arch"),
        (["model=cnn", "model.pretrained=true"], "model.pretrained"),
        (["model=cnn", "model.weights=w.safetensors"], "model.weights"),
        (["model=resnet_small", "model.arch=resnet18"], "model.arch"),
        (["model=timm", "model.pretrained=false", "model.freeze_epochs=0", "model.weights=w.pth"], "model.weights"),
        (["model=timm", "model.pretrained=false"], "model.freeze_epochs"),  # timm.yaml freezes 1 epoch
        (["model=cnn", "model.freeze_epochs=2"], "model.freeze_epochs"),
        (["model=timm", "model.arch=null"], "model.arch"),
        (["model=timm", "model.init_from=models"], "model.init_from"),
        (["model=timm", "model.mean=[0.5,0.5,0.5]"], "model.mean"),  # digits: 1 channel
        (["model=timm", "data.channels=3", "model.mean=[0.5]"], "model.mean"),
        (["model=timm", "model.std=[0.0]"], "model.std"),
        (["model=cnn", "model.std=[0.2,0.2]"], "model.std"),
        (["model=timm", "model.crop_pct=0.3"], "model.crop_pct"),
        (["model=timm", "model.interpolation=lanczos"], "model.interpolation"),
    ],
)
def test_bad_model_keys_are_one_line_naming_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(*overrides)
    message = str(caught.value)
    assert message.startswith(f"{key} must be "), message
    assert "\n" not in message


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=timm"],
        ["model=timm", "model.weights=w.safetensors"],
        ["model=timm", "model.pretrained=false", "model.freeze_epochs=0"],
        ["model=timm", "model.pretrained=false", "model.init_from=models"],  # frozen backbone from a cnnpipe model
        ["model=timm", "model.mean=[0.5]", "model.std=[0.25]", "model.crop_pct=0.875", "model.interpolation=nearest"],
        ["model=timm", "data.channels=3", "model.mean=[0.1,0.2,0.3]", "model.std=[0.3,0.3,0.3]"],
        ["model=cnn", "model.freeze_epochs=2", "model.init_from=models"],
        ["model=cnn", "model.mean=[0.5]", "model.std=[0.2]"],
    ],
)
def test_good_model_keys_are_accepted(overrides: list[str]) -> None:
    values = flatten(as_dict(config(*overrides)))
    for override in overrides:
        key, value = override.split("=", 1)
        assert values.get(key, values.get(f"{key}.name")) == yaml.safe_load(value), key
