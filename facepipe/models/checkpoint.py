"""Safe checkpoint loading shared by every model file.

Each architecture file provides a ``checkpoint_filter`` that maps the keys of the released weights onto
its own names; this module does the parts that are the same for all of them: reading the file without
unpickling arbitrary objects, unwrapping ``{"state_dict": ...}`` containers, stripping ``module.``
prefixes, and a strict load whose error names every missing, unexpected and mis-shaped key.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]
CheckpointFilter = Callable[[StateDict, nn.Module], StateDict]

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "backbone")


class CheckpointError(ValueError):
    """The weights file does not fit the model it is being loaded into."""


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a torch checkpoint with ``weights_only=True`` and return a flat tensor dict on CPU."""
    from facepipe.io.files import FileReadError, check_regular_file

    path = Path(path)
    if not path.is_file() and not os.path.lexists(path):
        raise CheckpointError(f"weights file not found: {path}")
    try:
        check_regular_file(path)  # torch.load would block on a FIFO
    except FileReadError as exc:
        raise CheckpointError(f"cannot read weights file {path}: {exc}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CheckpointError(f"cannot read weights file {path}: {exc}") from exc
    return unwrap_state_dict(obj, source=str(path))


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> StateDict:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source} is not a state dict of tensors (got {type(obj).__name__})")
    return clean_state_dict(dict(obj))


def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Strip DataParallel/DDP ``module.`` prefixes and drop BatchNorm ``num_batches_tracked`` counters."""
    cleaned: StateDict = {}
    for key, value in state_dict.items():
        while key.startswith("module."):
            key = key[len("module."):]
        if key.endswith("num_batches_tracked"):
            continue
        cleaned[key] = value
    return cleaned


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load strictly; on mismatch raise one error that lists missing, unexpected and mis-shaped keys."""
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    given = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(given)
        if tuple(given[k].shape) != tuple(expected[k].shape)
    )
    # load_state_dict would silently cast integer tensors into float parameters (int32-truncated weights load
    # "fine" and detect thousands of garbage faces), so a floating parameter must come from a floating tensor.
    mistyped = sorted(
        f"{k}: checkpoint {given[k].dtype} vs model {expected[k].dtype}"
        for k in set(expected) & set(given)
        if expected[k].is_floating_point() and not given[k].is_floating_point()
    )
    if missing or unexpected or misshaped or mistyped:
        lines = [f"{source} does not match {type(model).__name__}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped), ("wrong-dtype", mistyped)):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
                lines.append(f"  {title} keys ({len(keys)}): {shown}")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(dict(given), strict=False)  # counters absent on purpose; everything else checked above


def load_weights(
    model: nn.Module,
    path: str | os.PathLike,
    checkpoint_filter: CheckpointFilter | None = None,
) -> nn.Module:
    """Read ``path``, map foreign keys with ``checkpoint_filter`` and load strictly into ``model``."""
    state_dict = read_state_dict(path)
    if checkpoint_filter is not None:
        state_dict = checkpoint_filter(state_dict, model)
    load_state_dict_strict(model, state_dict, source=str(path))
    return model


def load_onnx_model_checked(path: str | os.PathLike):
    """Read an ONNX file as an ``onnx.ModelProto``, or raise one ``CheckpointError`` line: the path must be a
    regular file, parse as an ONNX model, have a graph with nodes, inputs and outputs, and pass
    ``onnx.checker`` (random bytes named ``.onnx`` otherwise surface as protobuf or onnxruntime tracebacks)."""
    try:
        import onnx
    except ImportError as exc:
        raise CheckpointError("reading .onnx files needs the 'onnx' package: pip install facepipe[onnx]") from exc
    from facepipe.io.files import FileReadError, check_regular_file, first_line

    path = Path(path)
    try:
        check_regular_file(path)
    except FileReadError as exc:
        raise CheckpointError(f"cannot read ONNX file {path}: {exc}") from None
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, onnx errors, OSError: not an ONNX file
        raise CheckpointError(f"cannot read ONNX file {path}: not an ONNX model ({first_line(exc)})") from None
    graph = model.graph
    if not graph.node or not graph.input or not graph.output:
        raise CheckpointError(f"cannot read ONNX file {path}: no graph (nodes, inputs or outputs missing)")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx.checker.ValidationError and friends
        raise CheckpointError(f"cannot read ONNX file {path}: invalid model ({first_line(exc)})") from None
    return model


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """facepipe's cache folder: ``$FACEPIPE_HOME``, else ``$FACEPIPE_CACHE`` (an older spelling), else ~/.cache/facepipe."""
    folder = os.environ.get("FACEPIPE_HOME") or os.environ.get("FACEPIPE_CACHE")
    return Path(folder) if folder else Path.home() / ".cache" / "facepipe"


def download_weights(url: str, sha256: str, filename: str | None = None) -> Path:
    """Download ``url`` into the facepipe cache once and verify its SHA-256 (weights users fetch themselves).

    The file is written under a temporary name and renamed only after the checksum matches, so an
    interrupted or corrupted download never leaves a file that looks valid.
    """
    target = cache_dir() / (filename or url.rsplit("/", 1)[-1])
    if target.is_file() and sha256_of(target) == sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise CheckpointError(f"cannot download {url}: {exc}. Download it yourself and pass --weights FILE.") from exc
    actual = sha256_of(partial)
    if actual != sha256:
        partial.unlink(missing_ok=True)
        raise CheckpointError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {actual}")
    os.replace(partial, target)
    return target
