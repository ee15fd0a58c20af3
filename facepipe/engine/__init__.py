"""Engines that run facepipe's batch jobs elsewhere than this machine's processes (``ray_engine``: Ray Data).

Importing this package does not import Ray; ``facepipe.engine.ray_engine`` imports it only when a job runs.
"""
