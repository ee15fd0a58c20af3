"""The streaming ``facepipe align`` job: sources, per-batch worker, sinks and the resumable manifest."""
