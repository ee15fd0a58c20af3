"""Batch jobs and the engines that run them.

``job``: the ``BatchJob`` contract (units of batches, a picklable worker, commit, finish) that align, embed and
IJB-C feature extraction implement. ``local``: worker processes on this machine (or this process), and
``run_job(job, engine=...)``, where commands choose the engine. ``ray_engine``: an actor pool on a Ray cluster.
Jobs never import an engine.

Importing this package does not import Ray; ``facepipe.engine.ray_engine`` imports it only when a job runs.
"""
