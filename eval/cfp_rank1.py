"""CFP frontal-to-profile identification: rank-1 rate of profile queries against a frontal gallery.

CFP (Celebrities in Frontal-Profile) has 500 identities x 10 frontal + 4 profile photos. Every image goes
through the same pipeline as ``facepipe eval cfp`` (``facepipe.evaluation.raw_pipeline``): detection on the
image with a black border (CFP photos are tight crops that defeat detectors at the edge), the main face by
insightface's rule, ArcFace alignment, embedding with flip test, L2 normalisation. Images without a detection
take insightface's centre-crop fallback and are counted. The gallery is a FAISS exact inner-product index (``facepipe.index``):

* ``all frontal``: every frontal image is a gallery entry; a query is right when its nearest entry has its
  identity;
* ``template``: one entry per identity, the normalised mean of its frontal embeddings.

Also prints frontal-to-frontal rank-1 (leave-one-out) as a sanity reference.

    .venv/bin/python eval/cfp_rank1.py --limit-identities 50            # a subset (fast)
    .venv/bin/python eval/cfp_rank1.py                                    # all 500 identities, 7000 images
    .venv/bin/python eval/cfp_rank1.py --model iresnet100 --weights backbone.pth
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from facepipe.detection.base import create_detector
from facepipe.embedding import create_embedder, l2_normalize
from facepipe.evaluation.raw_pipeline import PipelineSpec, extract_features
from facepipe.index.gallery import IndexParams, make_index
from facepipe.io.images import read_image

ASSETS = Path(os.environ.get("FACEPIPE_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "assets"
CFP_IMAGES = ASSETS / "cfp" / "cfp-dataset" / "Data" / "Images"


def list_cfp(root: Path, limit: int | None) -> list[tuple[str, str, Path]]:
    """``(identity, pose, path)`` for every image, identities in folder order (001 .. 500)."""
    identities = sorted(p.name for p in root.iterdir() if p.is_dir())
    if limit is not None:
        identities = identities[:limit]
    return [(identity, pose, path) for identity in identities for pose in ("frontal", "profile")
            for path in sorted((root / identity / pose).glob("*.jpg"))]


def rank1(gallery: np.ndarray, gallery_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray, exclude_self: bool = False) -> float:
    index = make_index(gallery.shape[1], len(gallery), IndexParams("flat"))
    index.add_with_ids(np.ascontiguousarray(gallery, dtype=np.float32), np.arange(len(gallery), dtype=np.int64))
    k = 2 if exclude_self else 1
    _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    if exclude_self:  # queries are the gallery itself: drop the query's own entry
        own = np.arange(len(queries))
        ids = np.where(ids[:, 0] == own, ids[:, 1], ids[:, 0])
    else:
        ids = ids[:, 0]
    return float((gallery_labels[ids] == query_labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfp", type=Path, default=CFP_IMAGES, help="CFP Data/Images folder.")
    parser.add_argument("--limit-identities", type=int, default=None, help="First N identities only.")
    parser.add_argument("--model", default="mobilefacenet")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--detector", default="retinaface")
    parser.add_argument("--detector-weights", default=None)
    parser.add_argument("--border", type=float, default=0.25, help="Black border added before detection, fraction of the longest side.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-flip", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="Feature cache shared with `facepipe eval cfp` (e.g. ~/.cache/facepipe/verification).")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.cfp.is_dir():
        raise SystemExit(f"CFP images not found at {args.cfp} (pass --cfp .../cfp-dataset/Data/Images)")

    entries = list_cfp(args.cfp, args.limit_identities)
    identities = np.array([e[0] for e in entries])
    frontal = np.array([e[1] == "frontal" for e in entries])
    detector = create_detector(args.detector, weights=args.detector_weights, device=args.device)
    options = {"threads": args.threads} if args.threads else {}
    embedder = create_embedder(args.model, weights=args.weights, device=args.device, batch_size=2 * args.batch_size, **options)
    spec = PipelineSpec(args.detector, args.detector_weights, args.model, args.weights, pad=args.border)
    started = time.perf_counter()
    features = extract_features(
        [str(e[2]) for e in entries], read_image, detector, embedder, spec, cache_dir=args.cache_dir,
        batch_size=args.batch_size, description="detect+align+embed",
    )
    seconds = time.perf_counter() - started
    raw = features.embedding + features.embedding_flip if not args.no_flip else features.embedding
    embeddings, fallbacks = l2_normalize(raw), features.n_fallback

    gallery, gallery_ids = embeddings[frontal], identities[frontal]
    queries, query_ids = embeddings[~frontal], identities[~frontal]
    names = np.unique(gallery_ids)
    templates = l2_normalize(np.stack([gallery[gallery_ids == name].mean(axis=0) for name in names]))
    print(f"CFP: {len(names)} identities, {frontal.sum()} frontal gallery images, {(~frontal).sum()} profile queries; "
          f"model {args.model}, detector {args.detector}, flip {not args.no_flip}")
    print(f"  {len(entries)} images in {seconds:.1f} s ({len(entries) / seconds:.1f} img/s); {fallbacks} without a detection (centre-crop fallback)")
    print(f"  rank-1 profile -> all frontal:       {100 * rank1(gallery, gallery_ids, queries, query_ids):6.2f} %")
    print(f"  rank-1 profile -> frontal templates: {100 * rank1(templates, names, queries, query_ids):6.2f} %")
    print(f"  rank-1 frontal -> other frontal:     {100 * rank1(gallery, gallery_ids, gallery, gallery_ids, exclude_self=True):6.2f} %")
    print(f"  chance level: {100 / len(names):.2f} %")


if __name__ == "__main__":
    main()
