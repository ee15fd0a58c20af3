"""IJB-C 1:1 at full scale from cached features: facepipe's pooling + scoring + ROC vs a per-template loop.

Synthetic data of exactly the IJB-C size: 469,375 images, 23,124 templates (3,531 gallery templates, one per
subject, and 19,593 probe templates), 15,658,489 pairs of which 19,557 genuine (every pair is gallery x probe, as
in the IJB-C 1:1 protocol). Templates hold a heavy-tailed number of images (mean ~20) spread over several media;
512-d [orig, flip] features have identity structure and varied norms; the features are written to a real
``FeatureCache`` (1.9 GB) that both implementations read.

Each implementation runs in its own child process so that its peak resident memory (ru_maxrss) is its own:

* ours: ``TemplatePooling`` + ``pool_templates`` (streamed shards, sparse products), ``score_pairs`` (blocked
  BLAS), ``roc_curve`` + ``tar_at_far``;
* loop: the ijb_11 reference algorithm written plainly: all features in memory, per-template ``np.where`` and
  per-media means, scoring by gathering template rows in batches of 100,000 pairs (the reference's batching), the
  same ROC. ``--loop-templates N`` pools only N templates with the loop and extrapolates linearly (stated in the
  output); scoring is always complete.

    python eval/bench_ijbc.py [--config N1D1F1] [--loop-templates 23124] [--workdir /tmp/ijbc_bench] [--keep]
    python eval/bench_ijbc.py --protocol 1n     # 1:N: galleries G1 / G2 (the 3,531 gallery subjects split in
                                                # two), all 19,593 probe templates searched in each (goal <= 30 s, <= 4 GB)

For ``--protocol 1n`` only facepipe runs (pooling from the cache, search, CMC and TPIR@FPIR, in a child process);
its figures are checked against a plain loop over the first 500 probes of each gallery.

The machine is shared: figures are noisy; the ratio comes from the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from facepipe.evaluation import ijbc, metrics
from facepipe.evaluation.ijbc_features import FeatureCache

NUM_IMAGES = 469_375
NUM_TEMPLATES = 23_124
NUM_SUBJECTS = 3_531  # = gallery templates
NUM_PAIRS = 15_658_489
NUM_GENUINE = 19_557
DIM = 512
SHARD = 4096


# ------------------------------------------------------------------------------------ synthetic data
def make_structure(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Templates, media and pairs with the IJB-C sizes; template ids and media ids sparse as in IJB-C."""
    subject_of_template = np.r_[np.arange(NUM_SUBJECTS), rng.integers(0, NUM_SUBJECTS, NUM_TEMPLATES - NUM_SUBJECTS)]
    weights = rng.lognormal(0.0, 1.0, NUM_TEMPLATES)
    images_per_template = 1 + rng.multinomial(NUM_IMAGES - NUM_TEMPLATES, weights / weights.sum())
    media_per_template = 1 + rng.binomial(images_per_template - 1, 0.25)
    template_order = rng.permutation(NUM_TEMPLATES)  # files list templates in no particular order
    template_of_image = np.repeat(template_order, images_per_template[template_order])
    media_offset = np.r_[0, np.cumsum(media_per_template)[:-1]] * 3
    media_local = (rng.random(NUM_IMAGES) * media_per_template[template_of_image]).astype(np.int64)
    template_ids = 10 + np.cumsum(rng.integers(1, 4, NUM_TEMPLATES))
    media_ids = 100 + media_offset[template_of_image] + media_local

    # Genuine: the first NUM_GENUINE probes against their subject's gallery template.
    probes = np.arange(NUM_SUBJECTS, NUM_TEMPLATES)
    genuine_probe = probes[:NUM_GENUINE]
    genuine = (subject_of_template[genuine_probe], genuine_probe)
    # Impostors: a uniform sample of the other gallery x probe cells, drawn block by block, trimmed exactly.
    need = NUM_PAIRS - NUM_GENUINE
    cells = NUM_SUBJECTS * len(probes)
    chosen = []
    for lo in range(0, NUM_SUBJECTS, 256):
        hi = min(lo + 256, NUM_SUBJECTS)
        mask = rng.random((hi - lo, len(probes))) < need / cells * 1.01
        g, p = np.nonzero(mask)
        g = g + lo
        p = probes[p]
        keep = subject_of_template[p] != g
        chosen.append(g[keep].astype(np.int64) * NUM_TEMPLATES + p[keep])
    flat = np.concatenate(chosen)
    del chosen
    flat = flat[np.sort(rng.choice(len(flat), need, replace=False))]
    t1 = np.r_[genuine[0], flat // NUM_TEMPLATES]
    t2 = np.r_[genuine[1], flat % NUM_TEMPLATES]
    del flat
    labels = np.r_[np.ones(NUM_GENUINE, np.int8), np.zeros(need, np.int8)]
    order = rng.permutation(NUM_PAIRS)
    return {
        "template_ids": template_ids,
        "subject_of_template": subject_of_template,
        "templates": template_ids[template_of_image],
        "medias": media_ids,
        "subject_of_image": subject_of_template[template_of_image],
        "t1": template_ids[t1[order]],
        "t2": template_ids[t2[order]],
        "labels": labels[order],
    }


def write_features(cache: FeatureCache, subject_of_image: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((NUM_SUBJECTS, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for k in range(cache.num_shards):
        start, stop = cache.shard_range(k)
        n = stop - start
        noise = rng.uniform(0.05, 0.2, (n, 1)).astype(np.float32)  # image quality varies
        base = centres[subject_of_image[start:stop]] + rng.standard_normal((n, DIM), dtype=np.float32) * noise
        pair = np.stack([base, base + rng.standard_normal((n, DIM), dtype=np.float32) * 0.01], axis=1)
        pair *= rng.uniform(5, 30, (n, 1, 1)).astype(np.float32)
        cache.write_shard(k, pair, rng.uniform(0.5, 1.0, n).astype(np.float32), np.zeros(n, np.uint8))


# ---------------------------------------------------------------------------------- implementations
def run_ours(work: Path, config: ijbc.ScoreConfig) -> dict:
    data = {k: np.load(work / f"{k}.npy") for k in ("templates", "medias", "t1", "t2", "labels")}
    cache = open_cache(work)
    times = {}
    t0 = time.perf_counter()
    pooling = ijbc.TemplatePooling.build(data["templates"], data["medias"])
    feats = ijbc.pool_templates(pooling, cache.iter_shards(), [config])[config]
    times["pool"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    scores = ijbc.score_pairs(feats, pooling.template_rows(data["t1"]), pooling.template_rows(data["t2"]))
    times["score"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    tars = metrics.tar_at_far(*metrics.roc_curve(data["labels"], scores)[:2])
    times["roc"] = time.perf_counter() - t2
    times["total"] = time.perf_counter() - t0
    np.save(work / "ours_scores.npy", scores)
    np.save(work / "ours_templates.npy", feats)
    return {"times": times, "tars": tars}


def run_loop(work: Path, config: ijbc.ScoreConfig, loop_templates: int) -> dict:
    data = {k: np.load(work / f"{k}.npy") for k in ("templates", "medias", "t1", "t2", "labels")}
    cache = open_cache(work)
    times = {}
    t0 = time.perf_counter()
    img_feats = np.concatenate([f.reshape(len(f), -1) for _, f, _, _ in cache.iter_shards()])  # (N, 2D) as ijb_11
    faceness = np.concatenate([s for _, _, s, _ in cache.iter_shards()])
    half = img_feats.shape[1] // 2
    x = img_feats[:, :half] + img_feats[:, half:] if config.flip else img_feats[:, :half]
    del img_feats
    if not config.norm_score:
        x = x / np.sqrt(np.sum(x**2, -1, keepdims=True))
    if config.detector_score:
        x = x * faceness[:, np.newaxis]
    templates, medias = data["templates"], data["medias"]
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), x.shape[1]))
    looped = min(loop_templates, len(unique_templates))
    prepare_seconds = time.perf_counter() - t0
    t_loop = time.perf_counter()
    for row, template in enumerate(unique_templates[:looped]):
        (ind_t,) = np.where(templates == template)
        face_feats = x[ind_t]
        face_medias = medias[ind_t]
        media_feats = []
        for media in np.unique(face_medias):
            (ind_m,) = np.where(face_medias == media)
            media_feats.append(np.mean(face_feats[ind_m], axis=0))
        template_feats[row] = np.sum(media_feats, axis=0)
    loop_seconds = time.perf_counter() - t_loop
    times["pool"] = prepare_seconds + loop_seconds * len(unique_templates) / looped
    if looped < len(unique_templates):  # untimed: finish with the fast path so that scoring covers all pairs
        pooling = ijbc.TemplatePooling.build(templates, medias)
        rest = np.zeros_like(template_feats)
        pooling.accumulate(rest, 0, x)
        template_feats[looped:] = rest[looped:]
    template_feats /= np.linalg.norm(template_feats, axis=1, keepdims=True)
    del x
    t1 = time.perf_counter()
    template2id = np.zeros(unique_templates.max() + 1, dtype=np.int64)
    template2id[unique_templates] = np.arange(len(unique_templates))
    p1, p2 = data["t1"], data["t2"]
    scores = np.zeros(len(p1))
    for s in range(0, len(p1), 100_000):
        feat1 = template_feats[template2id[p1[s : s + 100_000]]]
        feat2 = template_feats[template2id[p2[s : s + 100_000]]]
        scores[s : s + 100_000] = np.sum(feat1 * feat2, -1)
    times["score"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    tars = metrics.tar_at_far(*metrics.roc_curve(data["labels"], scores)[:2])
    times["roc"] = time.perf_counter() - t2
    times["total"] = times["pool"] + times["score"] + times["roc"]
    np.save(work / "loop_scores.npy", scores)
    np.save(work / "loop_templates.npy", template_feats)
    return {"times": times, "tars": tars, "looped_templates": looped}


def template_sets(work: Path) -> tuple[list, object]:
    """IJB-C's 1:N design on the synthetic set: gallery subjects split alternately into G1 and G2 (one template
    each), every probe template searched in both (mated in one, non-mated in the other)."""
    from facepipe.evaluation.ijbc_1n import TemplateSet

    ids, subjects = np.load(work / "template_ids.npy"), np.load(work / "subject_of_template.npy")
    gallery = np.arange(NUM_SUBJECTS)
    galleries = [TemplateSet(name, ids[gallery[part::2]], subjects[gallery[part::2]]) for part, name in ((0, "G1"), (1, "G2"))]
    return galleries, TemplateSet("probe", ids[NUM_SUBJECTS:], subjects[NUM_SUBJECTS:])


def run_ours_1n(work: Path, config: ijbc.ScoreConfig) -> dict:
    from facepipe.evaluation import ijbc_1n

    data = {k: np.load(work / f"{k}.npy") for k in ("templates", "medias")}
    cache = open_cache(work)
    galleries, probes = template_sets(work)
    t0 = time.perf_counter()
    pooling = ijbc.TemplatePooling.build(data["templates"], data["medias"])
    feats = ijbc.pool_templates(pooling, cache.iter_shards(), [config])[config]
    pooled = time.perf_counter() - t0
    results = ijbc_1n.evaluate_identification(feats, pooling, galleries, probes, f"facepipe {config.code}")
    total = time.perf_counter() - t0
    check = {}
    for gallery in galleries:  # a plain loop over the first probes: the same ranks
        g = feats[pooling.template_rows(gallery.templates)]
        p = feats[pooling.template_rows(probes.templates[:500])]
        ranks = []
        for row, subject in zip(p, probes.subjects[:500]):
            if subject not in gallery.subjects:
                continue
            sims = g @ row
            mate = sims[gallery.subjects == subject].max()
            ranks.append(1 + int(np.sum((sims >= mate) & (gallery.subjects != subject))))
        fast = ijbc_1n.search(p, probes.subjects[:500], g, gallery.subjects)
        check[gallery.name] = bool(np.array_equal(np.array(ranks), fast.rank[fast.mated]))
    return {"times": {"pool": pooled, "search": total - pooled, "total": total},
            "results": [r.to_json() for r in results], "loop_agrees": check}


def open_cache(work: Path) -> FeatureCache:
    stored = json.loads((work / "cache" / "manifest.json").read_text())
    return FeatureCache(work / "cache", stored["key"], stored["num_images"])


def child_main(role: str, work: Path, config: str, loop_templates: int) -> None:
    parsed = ijbc.ScoreConfig.parse(config)
    runs = {"ours": run_ours, "ours_1n": run_ours_1n}
    result = runs[role](work, parsed) if role in runs else run_loop(work, parsed, loop_templates)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    result["cpu_s"] = usage.ru_utime + usage.ru_stime  # whole child incl. start-up: meaningful on a loaded machine
    print("RESULT " + json.dumps(result))


def run_child(role: str, work: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", role, "--workdir", str(work), "--config", args.config, "--loop-templates", str(args.loop_templates)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{role} child failed:\n{done.stderr}")
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="N1D1F1")
    parser.add_argument("--loop-templates", type=int, default=NUM_TEMPLATES, help="templates pooled by the loop (rest extrapolated)")
    parser.add_argument("--workdir", default=None, help="where the 1.9 GB synthetic cache goes (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (re-used when it holds a complete cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--protocol", choices=["11", "1n"], default="11", help="1:1 verification or 1:N identification")
    parser.add_argument("--child", choices=["ours", "loop", "ours_1n"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child, Path(args.workdir), args.config, args.loop_templates)
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ijbc_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not (work / "template_ids.npy").is_file() or not open_cache(work).complete:
            t0 = time.perf_counter()
            structure = make_structure(np.random.default_rng(args.seed))
            cache = FeatureCache(work / "cache", {"synthetic": "ijbc-size", "seed": args.seed}, NUM_IMAGES, SHARD)
            write_features(cache, structure.pop("subject_of_image"), args.seed + 1)
            for name, array in structure.items():
                np.save(work / f"{name}.npy", array)
            print(f"synthetic data: {time.perf_counter() - t0:.1f} s -> {work}")
        labels = np.load(work / "labels.npy")
        sizes = json.loads((work / "cache" / "manifest.json").read_text())["num_images"]
        print(f"images {sizes:,}  templates {len(np.unique(np.load(work / 'templates.npy'))):,}  pairs {len(labels):,}  genuine {int(labels.sum()):,}  dim {DIM}  config {args.config}")

        if args.protocol == "1n":
            result = run_child("ours_1n", work, args)
            t = result["times"]
            print(f"1:N  G1 {NUM_SUBJECTS - NUM_SUBJECTS // 2:,} + G2 {NUM_SUBJECTS // 2:,} gallery templates, "
                  f"{NUM_TEMPLATES - NUM_SUBJECTS:,} probe templates searched in each")
            print(f"facepipe pool {t['pool']:6.1f} s  search + CMC + TPIR {t['search']:6.1f} s  total {t['total']:6.1f} s"
                  f"  (process CPU {result['cpu_s']:6.1f} s)  peak RSS {result['peak_rss_mb']:7.0f} MB")
            print(f"plain loop over the first 500 probes gives the same ranks: {result['loop_agrees']}")
            for row in result["results"]:
                print(f"  {row['name']:<22} rank-1 {row['CMC']['rank1'] * 100:6.2f}  TPIR@FPIR=0.01 "
                      f"{row['TPIR@FPIR']['0.01'] * 100:6.2f}  @0.1 {row['TPIR@FPIR']['0.1'] * 100:6.2f}")
            return
        ours = run_child("ours", work, args)
        loop = run_child("loop", work, args)
        note = "" if loop["looped_templates"] == NUM_TEMPLATES else f"  (loop pooled {loop['looped_templates']} templates, pooling time extrapolated linearly)"
        for name, result in (("facepipe", ours), ("loop", loop)):
            t = result["times"]
            print(
                f"{name:9s} pool {t['pool']:7.1f} s  score {t['score']:6.1f} s  roc {t['roc']:5.1f} s  total {t['total']:7.1f} s"
                f"  (process CPU {result['cpu_s']:6.1f} s)  peak RSS {result['peak_rss_mb']:7.0f} MB"
            )
        print(f"speed-up (loop / facepipe total): {loop['times']['total'] / ours['times']['total']:.1f}x{note}")

        ours_scores, loop_scores = np.load(work / "ours_scores.npy"), np.load(work / "loop_scores.npy")
        template_diff = np.abs(np.load(work / "ours_templates.npy") - np.load(work / "loop_templates.npy")).max()
        print(f"agreement: max |template diff| {template_diff:.2e}, max |score diff| {np.abs(ours_scores - loop_scores).max():.2e}")
        print("TAR@FAR facepipe: " + metrics.tar_table([("facepipe", ours["tars"]), ("loop", loop["tars"])]).replace("\n", "\n                  "))
        if ours["tars"] != loop["tars"]:
            print("WARNING: TAR@FAR differ between implementations")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
