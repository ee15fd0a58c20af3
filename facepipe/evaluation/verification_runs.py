"""The verification runs behind ``facepipe eval verify | cfp | lfw | compare-detectors``, as a library.

* ``evaluate_bin``: an insightface .bin with its own (released) alignment: embed crops and mirrors, the protocol;
* ``run_pairs``: a pair list of raw images (CFP, LFW) through detect -> align -> embed
  (``facepipe.evaluation.raw_pipeline``, content-keyed cache), the protocol on the official folds;
* ``realign_bin``: a .bin's crops re-aligned by a detector (padded, detected, aligned again);
* ``ComparisonTable``: the detector comparison (RetinaFace paper, Table 4), one row per detector and model,
  accumulated across calls in its JSON file (a rerun of a row replaces it).

Each returns reports (``facepipe.evaluation.verification.BenchmarkReport``) and raises ``VerificationRunError``
(one line: what and where) for bad input; commands turn it into their error message.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from facepipe.evaluation.metrics import markdown_table
from facepipe.evaluation.verification import BenchmarkReport, evaluate_embeddings, evaluate_interleaved, write_json
from facepipe.io.atomic import atomic_write_text
from facepipe.io.digest import file_fingerprint

DETECTOR_TITLES = {
    "mtcnn": "MTCNN",
    "retinaface": "RetinaFace",
    "retinaface-r50": "RetinaFace-R50",
    "retinaface-onnx": "RetinaFace (ONNX)",
    "scrfd": "SCRFD",
}


class VerificationRunError(ValueError):
    """Bad input to a verification run (a damaged .bin, a missing image, too few pairs, a bad protocol file)."""


def block_title(benchmark: str, model: str, detector: str | None) -> str:
    """The line that opens every printed result block: which benchmark, detector and model it belongs to."""
    aligned_by = f"detector {detector}" if detector else "released crops (no detector)"
    return f"== {benchmark} · {aligned_by} · model {model} =="


def summary_line(report: BenchmarkReport, summary: dict[str, Any]) -> str:
    return (
        f"[{report.name}]images: {summary['images']} ({summary.get('reused', 0)} features reused from the cache, "
        f"{summary.get('computed', summary['images'])} computed), no face found (fallback crop): {summary['fallback']}"
    )


def check_pair_count(name: str, pairs: Any) -> None:
    if len(pairs) < 2:
        raise VerificationRunError(f"{name}: {len(pairs)} pair(s) selected; the protocol needs at least 2")


# --------------------------------------------------------------------------------------------------- .bin files
def embed_aligned(embedder: Any, images: np.ndarray, batch_size: int, description: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw embeddings of aligned crops and of their mirrors, batched, with a progress bar."""
    from tqdm import tqdm

    dim = embedder.embedding_size
    plain = np.empty((len(images), dim), dtype=np.float32)
    mirrored = np.empty((len(images), dim), dtype=np.float32)
    with tqdm(total=len(images), desc=description, unit="img") as bar:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            plain[start : start + len(chunk)], mirrored[start : start + len(chunk)] = embedder.embed_pair(chunk)
            bar.update(len(chunk))
    return plain, mirrored


def _load_bin(path: str | os.PathLike, limit_pairs: int | None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    from facepipe.io.verification_bin import VerificationBinError, load_bin

    try:
        images, issame = load_bin(path, limit_pairs=limit_pairs, progress=progress)
    except VerificationBinError as exc:
        raise VerificationRunError(str(exc)) from None
    if len(issame) < 2:
        raise VerificationRunError(f"{path}: {len(issame)} pair(s); the protocol needs at least 2")
    return images, issame


def evaluate_bin(
    path: str | os.PathLike, embedder: Any, batch_size: int = 32, limit_pairs: int | None = None, name: str | None = None
) -> BenchmarkReport:
    """Evaluate one .bin with its own (released) alignment."""
    name = name or Path(path).stem
    images, issame = _load_bin(path, limit_pairs, progress=True)
    plain, mirrored = embed_aligned(embedder, images, batch_size, f"embed {name}")
    return evaluate_interleaved(name, plain, mirrored, issame, n_folds=min(10, len(issame)))


# --------------------------------------------------------------------------------------------------- raw images
def cfp_pair_lists(root: str, protocols: Sequence[str], splits: list[int] | None, limit: int | None) -> dict[str, Any]:
    """``{protocol: pairs}`` for CFP-FF / CFP-FP, restricted to ``splits`` and ``limit`` pairs per fold."""
    from facepipe.evaluation.protocols import ProtocolError, read_cfp_pairs

    try:
        lists = {p: read_cfp_pairs(root, p).subset(splits, limit) for p in protocols}
    except ProtocolError as exc:
        raise VerificationRunError(str(exc)) from None
    for protocol, pairs in lists.items():
        check_pair_count(f"CFP-{protocol}", pairs)
    return lists


def lfw_pair_list(root: str, pairs_file: str, splits: list[int] | None, limit: int | None) -> Any:
    from facepipe.evaluation.protocols import ProtocolError, read_lfw_pairs

    try:
        pairs = read_lfw_pairs(pairs_file, root).subset(splits, limit)
    except ProtocolError as exc:
        raise VerificationRunError(str(exc)) from None
    check_pair_count("LFW", pairs)
    return pairs


def run_pairs(
    name: str, pairs: Any, detector: Any, embedder: Any, spec: Any, cache_dir: Path | None, batch_size: int
) -> tuple[BenchmarkReport, dict[str, Any]]:
    """Features for every image of ``pairs`` (cached by content), then the protocol on the official folds."""
    from facepipe.evaluation.raw_pipeline import extract_features, feature_summary
    from facepipe.io.images import ImageDecodeError, read_image

    check_pair_count(name, pairs)
    missing = pairs.missing_paths()
    if missing:
        shown = "\n  ".join(str(p) for p in missing[:5])
        raise VerificationRunError(f"{name}: {len(missing)} image(s) of the protocol are missing, e.g.\n  {shown}")

    def load(key: str) -> np.ndarray:
        try:
            return read_image(key)
        except ImageDecodeError as exc:
            raise VerificationRunError(f"{key}: {exc}") from None

    # Absolute (not symlink-resolved) paths: the cache key must not depend on the working directory.
    keys = [os.path.abspath(p) for p in pairs.unique_paths()]
    features = extract_features(
        keys, load, detector, embedder, spec, cache_dir=cache_dir, batch_size=batch_size,
        description=f"{name} {spec.detector}",
    )
    position = features.index()
    left = np.array([position[os.path.abspath(p)] for p in pairs.left], dtype=np.int64)
    right = np.array([position[os.path.abspath(p)] for p in pairs.right], dtype=np.int64)
    several_folds = len(pairs.folds) >= 2
    report = evaluate_embeddings(
        name,
        features.embedding[left],
        features.embedding_flip[left],
        features.embedding[right],
        features.embedding_flip[right],
        pairs.issame,
        n_folds=min(10, len(pairs)),
        fold_ids=pairs.fold if several_folds else None,
    )
    summary = feature_summary(features)
    summary["folds"] = pairs.folds if several_folds else f"10 ordered folds inside fold {pairs.folds[0]}"
    return report, summary


def realign_bin(
    path: str | os.PathLike, detector: Any, detector_name: str, embedder: Any, spec: Any, cache_dir: Path | None,
    batch_size: int, limit_pairs: int | None,
) -> tuple[BenchmarkReport, dict[str, Any]]:
    """A .bin re-aligned by ``detector``: each crop padded, detected, aligned again (crop kept if no face).
    Its entries' content stamp is the .bin's own fingerprint."""
    from facepipe.evaluation.raw_pipeline import extract_features, feature_summary

    name = Path(path).stem
    images, issame = _load_bin(path, limit_pairs)
    resolved = str(Path(path).resolve())
    bin_stamp = file_fingerprint(resolved)
    keys = [f"{resolved}#{i}" for i in range(len(images))]
    features = extract_features(
        keys, lambda key: images[int(key.rsplit("#", 1)[1])], detector, embedder, spec,
        cache_dir=cache_dir, batch_size=batch_size, description=f"{name} {detector_name}", stamp=lambda key: bin_stamp,
    )
    report = evaluate_interleaved(name, features.embedding, features.embedding_flip, issame, n_folds=min(10, len(issame)))
    return report, feature_summary(features)


# --------------------------------------------------------------------------------------------------- comparison
@dataclass
class ComparisonTable:
    """Rows ``{"key", "method", "detector", "model", "results": {column: entry}}``, accumulated in ``json_path``:
    ``add`` puts the latest rows first, replacing stored rows with the same key (detector, model, weights)."""

    columns: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def row_key(detector: str | None, model: str, weights: str | None) -> str:
        return f"{detector or 'released'}|{model}|{weights or 'bundled'}"

    @classmethod
    def load(cls, json_path: Path) -> "ComparisonTable":
        if not json_path.is_file():
            return cls()
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
            rows = [{"key": cls.row_key(r["detector"], r.get("model", "?"), r.get("weights")), **r} for r in data["rows"]]
            return cls(list(data["columns"]), rows, dict(data.get("meta", {})))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VerificationRunError(f"{json_path} is not a comparison table ({exc}); remove it or use another --out") from None

    def add(self, columns: Sequence[str], rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> None:
        latest = {row["key"]: row for row in rows}
        self.rows = [*latest.values(), *(r for r in self.rows if r["key"] not in latest)]
        self.columns = [*columns, *(c for c in self.columns if c not in columns)]
        self.meta = meta

    def markdown(self) -> str:
        """One row per method, accuracy (%) +- std per benchmark column, then fallback counts."""
        cells = []
        for row in self.rows:
            values = []
            for column in self.columns:
                result = row["results"].get(column)
                values.append("-" if result is None else f"{100 * result['acc']:.2f} ± {100 * result['std']:.2f}")
            cells.append([row["method"], *values])
        lines = [markdown_table(["Method", *self.columns], cells), ""]
        models = sorted({str(row.get("model")) for row in self.rows})
        lines.append(f"Accuracy (%) of the 10-fold protocol with the flip test, embedder {', '.join(f'`{m}`' for m in models)}.")
        notes = []
        for row in self.rows:
            for column in self.columns:
                result = row["results"].get(column)
                if result is not None and result.get("images", {}).get("fallback"):
                    images = result["images"]
                    notes.append(f"{row['method']} / {column}: no face found in {images['fallback']} of {images['images']} images")
        if notes:
            lines.append("Fallback crops (no face above the score threshold): " + "; ".join(notes) + ".")
        return "\n".join(lines) + "\n"

    def write(self, markdown_path: Path, json_path: Path) -> str:
        table = self.markdown()
        atomic_write_text(markdown_path, table)
        write_json({"columns": self.columns, "rows": [{k: v for k, v in r.items() if k != "key"} for r in self.rows], "meta": self.meta}, json_path)
        return table
