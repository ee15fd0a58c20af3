"""Time and peak memory of ``facepipe audit`` on synthetic MS1M-shaped embeddings, and how both grow with size.

Each size runs in a fresh child process (peak RSS is per process): it writes a synthetic embedding folder in
facepipe's store format (identities of 20–200 images around random centres, 2 % of the images misfiled, 1 % of
the identities split, 0.5 % near-copies; 512-d, float32 shards of 500k rows) and then times
``load_embedding_folder`` + ``audit`` + ``write_outputs``: wall and CPU seconds (CPU is the steadier figure on
shared cores) and peak RSS per stage, flags found against the injected truth, the neighbour searches' recall,
and how time and memory grow from one size to the next (with an extrapolation to MS1M size).

    python eval/bench_audit.py --sizes 500000,1000000,2000000 --workdir /tmp/bench_audit
    python eval/bench_audit.py --sizes 5800000 --identity-sizes 20,116   # MS1M shape: 5.8 M images, ~85 k identities

Goal (issue 13): MS1M size (5.8 M images, 85 k identities) in ≤ 30 min and ≤ 8 GB on 2 cores, linear growth.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from facepipe.runtime.cpu import cpu_summary

DIM = 512
SHARD = 500_000



def write_synthetic(folder: Path, n_images: int, seed: int = 0, identity_sizes: tuple[int, int] = (20, 200)) -> dict:
    """A facepipe embedding folder with identity structure and injected faults; returns the truth counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from facepipe.embedding.store import MANIFEST_SCHEMA

    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < n_images:
        sizes.append(int(rng.integers(identity_sizes[0], identity_sizes[1] + 1)))
    sizes[-1] -= sum(sizes) - n_images
    n_ids = len(sizes)
    identity = np.repeat(np.arange(n_ids), sizes)
    labels = identity.copy()
    misfiled = rng.choice(n_images, n_images // 50, replace=False)
    labels[misfiled] = (identity[misfiled] + 1 + rng.integers(0, n_ids - 1, len(misfiled))) % n_ids
    names = [f"id{i:06d}" for i in range(n_ids)]
    split = rng.choice(n_ids, max(1, n_ids // 100), replace=False)
    names += [f"id{i:06d}_alt" for i in split]
    alt = {int(i): n_ids + j for j, i in enumerate(split)}
    for i, new in alt.items():
        rows = np.flatnonzero(labels == i)
        labels[rows[1::2]] = new
    copies = rng.choice(n_images, n_images // 200, replace=False)
    shards = folder / "shards"
    shards.mkdir(parents=True)
    centres = rng.standard_normal((n_ids, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    copy_of = np.full(n_images, -1)
    is_copy = np.zeros(n_images, dtype=bool)
    is_copy[copies] = True
    copy_of[copies] = rng.choice(np.flatnonzero(~is_copy), len(copies))  # each copy reproduces another image
    rows_total = 0
    for shard, start in enumerate(range(0, n_images, SHARD)):
        stop = min(n_images, start + SHARD)
        x = centres[identity[start:stop]] + 0.045 * rng.standard_normal((stop - start, DIM)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(shards / f"emb-{shard:06d}.npy", x)
        paths = [f"{names[labels[i]]}/{i:08d}.jpg" for i in range(start, stop)]
        table = pa.table(
            {
                "index": np.arange(start, stop, dtype=np.int64),
                "shard": np.full(stop - start, shard, np.int32),
                "row": np.arange(stop - start, dtype=np.int32),
                "path": paths,
                "identity": [p.rsplit("/", 1)[0] for p in paths],
                "norm": np.ones(stop - start, np.float32),
                "det_score": np.full(stop - start, np.nan, np.float32),
                "sharpness": np.full(stop - start, np.nan, np.float32),
                "status": ["ok"] * (stop - start),
                "reason": [""] * (stop - start),
            },
            schema=MANIFEST_SCHEMA,
        )
        pq.write_table(table, shards / f"emb-{shard:06d}.parquet")
        rows_total += stop - start
    # near-copies: overwrite rows after the fact (needs the source rows: second pass over shards in memory)
    for shard_path in sorted(shards.glob("emb-*.npy")):
        matrix = np.load(shard_path)
        shard = int(shard_path.stem.split("-")[1])
        start = shard * SHARD
        for target in copies[(copies >= start) & (copies < start + len(matrix))]:
            source = int(copy_of[target])
            src_matrix = matrix if start <= source < start + len(matrix) else np.load(shards / f"emb-{source // SHARD:06d}.npy", mmap_mode="r")
            v = np.asarray(src_matrix[source - (source // SHARD) * SHARD]) + 0.01 * rng.standard_normal(DIM).astype(np.float32)
            matrix[target - start] = v / np.linalg.norm(v)
        np.save(shard_path, matrix)
    parts = [pq.read_table(p) for p in sorted(shards.glob("emb-*.parquet"))]
    pq.write_table(pa.concat_tables(parts), folder / "manifest.parquet")
    (folder / "run.json").write_text(json.dumps({"model": "synthetic", "weights": None, "flip": True, "embedding_size": DIM}))
    return {"images": n_images, "identities": n_ids + len(split), "misfiled": int(len(misfiled)), "split": int(len(split)), "copies": int(len(copies))}


def child(folder: Path) -> None:
    from facepipe.audit.data import load_embedding_folder
    from facepipe.audit.run import Stages, audit, peak_rss_gb, write_outputs

    started = time.perf_counter()
    outer = Stages()
    with outer("load"):
        data = load_embedding_folder(folder)
    result = audit(data)
    with outer("write"):
        write_outputs(result, folder / "audit")
    seconds = time.perf_counter() - started
    inner = result.summary["stages"]
    stages = {key: {"load": outer.to_dict()[key]["load"], **inner[key], "write": outer.to_dict()[key]["write"]} for key in inner}
    print(json.dumps({"seconds": round(seconds, 1), "cpu_seconds": round(time.process_time(), 1),
                      "peak_rss_gb": round(peak_rss_gb(), 2),
                      "flagged": result.summary["flagged"], "search": result.summary["search"], "stages": stages}))


def growth(runs: list[tuple[int, dict]]) -> None:
    """Ratios between consecutive sizes, the exponent b of time ∝ N^b (1 = linear), and a 5.8 M extrapolation."""
    print("\n| from → to | size ×| wall ×| CPU ×| peak RSS ×| wall exponent | CPU exponent |")
    print("|---|---|---|---|---|---|---|")
    for (n0, r0), (n1, r1) in zip(runs, runs[1:]):
        size = n1 / n0
        wall, cpu, rss = r1["seconds"] / r0["seconds"], r1["cpu_seconds"] / r0["cpu_seconds"], r1["peak_rss_gb"] / r0["peak_rss_gb"]
        print(f"| {n0:,} → {n1:,} | {size:.2f} | {wall:.2f} | {cpu:.2f} | {rss:.2f} | {np.log(wall) / np.log(size):.2f} | {np.log(cpu) / np.log(size):.2f} |")
    if len(runs) >= 2:
        (n0, r0), (n1, r1) = runs[-2], runs[-1]
        ms1m = 5_800_000
        for key in ("seconds", "cpu_seconds"):
            b = max(1.0, np.log(r1[key] / r0[key]) / np.log(n1 / n0))
            print(f"extrapolated to {ms1m:,} images ({key}, exponent {b:.2f} from the last two sizes): {r1[key] * (ms1m / n1) ** b:.0f} s")
        b = np.log(r1["peak_rss_gb"] / r0["peak_rss_gb"]) / np.log(n1 / n0)
        print(f"extrapolated peak RSS at {ms1m:,} images (exponent {b:.2f}): {r1['peak_rss_gb'] * (ms1m / n1) ** b:.1f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="500000,1000000,2000000")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_audit"))
    parser.add_argument("--identity-sizes", default="20,200", metavar="LO,HI",
                        help="images per identity, uniform in [LO, HI] (20,116: MS1M's 85 k identities at 5.8 M)")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    print(f"CPU: {cpu_summary()}, {os.cpu_count()} cores")
    print("| images | identities | wall (s) | CPU (s) | peak RSS (GB) | flagged noise / split / copies (true) | image-image search, recall@6 |")
    print("|---|---|---|---|---|---|---|")
    runs = []
    for size in (int(s) for s in args.sizes.split(",")):
        folder = args.workdir / f"n{size}"
        shutil.rmtree(folder, ignore_errors=True)
        lo, hi = (int(v) for v in args.identity_sizes.split(","))
        truth = write_synthetic(folder, size, identity_sizes=(lo, hi))
        out = subprocess.run([sys.executable, __file__, "--child", str(folder)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {size:,} | failed: {out.stderr.strip().splitlines()[-1:]} |", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
            break
        result = json.loads(out.stdout.strip().splitlines()[-1])
        runs.append((size, result))
        f = result["flagged"]
        search = result["search"]["image_to_image"]
        print(
            f"| {size:,} | {truth['identities']:,} | {result['seconds']} | {result['cpu_seconds']} | {result['peak_rss_gb']} | "
            f"{f['label_noise']} / {f['duplicate_identities']} / {f['near_duplicates']} "
            f"({truth['misfiled']} / {truth['split']} / {truth['copies']}) | {search['method']}, {search['recall']:.3f} |",
            flush=True,
        )
        stages = result["stages"]
        print("    stages, wall s / CPU s / peak RSS GB at its end: " + ", ".join(
            f"{name} {sec} / {stages['cpu_seconds'][name]} / {stages['peak_rss_gb'][name]}" for name, sec in stages["seconds"].items()),
            flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    growth(runs)


if __name__ == "__main__":
    main()
