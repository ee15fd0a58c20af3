"""The local engine: runs any ``BatchJob`` (``facepipe.engine.job``) on this machine.

``workers=0`` runs every batch in this process, in order. (Process pools, interruption handling and worker
replacement build on this same loop.)
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from facepipe.engine.job import BatchJob, JobProgress


def run_local(job: BatchJob, workers: int = 0, progress: bool = True) -> JobProgress:
    """Run every pending unit of ``job`` and commit it; ``finish`` is the caller's (it returns the summary)."""
    from tqdm import tqdm

    units = job.pending()
    done = JobProgress()
    bar = tqdm(total=sum(unit.items for unit in units), unit="img", desc=job.name, disable=not progress, dynamic_ncols=True)
    try:
        worker = job.worker()
        if units:
            worker.prepare()
        for unit in units:
            results: list[pa.Table] = []
            for batch in unit.batches:
                table = worker(batch)
                results.append(table)
                bar.update(table.num_rows)
            job.commit(unit, results)
            done.units_done += 1
            done.items_done += unit.items
    finally:
        bar.close()
    return done


def run_job(job: BatchJob, engine: str = "local", workers: int | None = 0, progress: bool = True, **engine_options: Any) -> Any:
    """Run ``job`` on the chosen engine, then ``job.finish()`` (whose value is returned)."""
    if engine == "local":
        run_local(job, workers=workers or 0, progress=progress)
    elif engine == "ray":
        from facepipe.engine.ray_engine import run_ray

        run_ray(job, progress=progress, **engine_options)
    else:
        raise ValueError(f"unknown engine {engine!r}; choose local or ray")
    return job.finish()
