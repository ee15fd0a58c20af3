"""Ray engine overhead on one machine: align and embed the same CFP images with the local engine and on a local
Ray cluster, with the same parallelism, and print images/s and the Ray/local ratio.

    .venv/bin/python eval/bench_ray.py --images 96 --workers 1

One machine cannot show Ray's scaling; this measures what Ray costs per job (cluster start, actor start and model
load, descriptor and result transfer through the object store) so the scaling plan in the README can subtract it.
The outputs of both engines are compared byte for byte as a check that the same work was timed.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CFP = REPO.parent / "shared" / "assets" / "cfp" / "cfp-dataset" / "Data" / "Images"


def make_inputs(root: Path, count: int) -> Path:
    """``count`` CFP frontal images as symlinks in identity folders."""
    images = root / "images"
    paths = sorted(CFP.glob("*/frontal/*.jpg"))[:count]
    if len(paths) < count:
        raise SystemExit(f"only {len(paths)} CFP images under {CFP}")
    for path in paths:
        target = images / path.parent.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)
    return images


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--workers", type=int, default=1, help="local worker processes = Ray actors")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=32)
    args = parser.parse_args()

    import ray

    from facepipe.embedding.store import EmbedSpec, embed_directory
    from facepipe.engine.local import run_job
    from facepipe.engine.ray_engine import RayOptions
    from facepipe.pipeline.align import AlignConfig, AlignJob, run_align
    from facepipe.pipeline.sources import directory_source

    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    try:
        source = directory_source(make_inputs(work, args.images))
        config = AlignConfig()
        common = dict(batch_size=args.batch_size, chunk_size=args.chunk_size, progress=False)
        rows = []

        started = time.perf_counter()
        run_align(config, source, work / "align_local", workers=args.workers, **common)
        rows.append(("align", "local", time.perf_counter() - started))

        started = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
        ray_start = time.perf_counter() - started

        options = RayOptions(actors=args.workers)
        started = time.perf_counter()
        with AlignJob(config, source, work / "align_ray", batch_size=args.batch_size, chunk_size=args.chunk_size) as job:
            run_job(job, "ray", progress=False, options=options)
        rows.append(("align", "ray", time.perf_counter() - started))
        same_align = files(work / "align_local") == files(work / "align_ray")

        spec = EmbedSpec()
        started = time.perf_counter()
        embed_directory(work / "align_local", work / "emb_local", spec, batch_size=32, shard_size=args.chunk_size,
                        threads=args.workers, progress=False)
        rows.append(("embed", "local", time.perf_counter() - started))
        started = time.perf_counter()
        embed_directory(work / "align_local", work / "emb_ray", spec, batch_size=32, shard_size=args.chunk_size,
                        progress=False, engine="ray", options=options)
        rows.append(("embed", "ray", time.perf_counter() - started))
        same_embed = files(work / "emb_local") == files(work / "emb_ray")
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{args.images} CFP images, {args.workers} local worker(s) = {args.workers} Ray actor(s), "
          f"local Ray cluster of {args.cpus} CPUs (started in {ray_start:.1f} s, not counted below)")
    print(f"{'job':6} {'engine':6} {'seconds':>8} {'images/s':>9} {'ray/local':>10}")
    for job in ("align", "embed"):
        local = next(s for j, e, s in rows if j == job and e == "local")
        for _, engine, seconds in ((j, e, s) for j, e, s in rows if j == job):
            ratio = f"{local / seconds:.2f}x" if engine == "ray" else ""
            print(f"{job:6} {engine:6} {seconds:8.2f} {args.images / seconds:9.1f} {ratio:>10}")
    print(f"identical outputs: align {same_align}, embed {same_embed}")


if __name__ == "__main__":
    main()
