"""The Ray engine against the local engine on real CFP images (plus a corrupt file): same crop bytes, same
manifests, same embeddings, same IJB-C feature cache; resume, retry after an actor crash, and the missing-Ray
error. One local Ray cluster (2 CPUs) for the module."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from facepipe.cli import main as cli
from facepipe.engine.ray_engine import RAY_INSTALL_HINT, RayOptions, RayUnavailableError, import_ray
from facepipe.engine.local import run_job
from facepipe.pipeline.align import AlignConfig, AlignJob, run_align
from facepipe.pipeline.sources import Item, directory_source
from tests.conftest import shared_path

CFP_IMAGES = [("001", "frontal", "01"), ("001", "frontal", "02"), ("001", "profile", "01"), ("002", "frontal", "01"),
              ("002", "frontal", "03"), ("002", "profile", "02"), ("003", "frontal", "05")]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    # Ray pickles this module's test classes (CrashOnceSource) by value: workers need not import tests/.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Seven CFP images in identity folders, and a truncated JPEG among them."""
    cfp = shared_path("cfp", "cfp-dataset", "Data", "Images")
    root = tmp_path_factory.mktemp("images")
    for person, view, name in CFP_IMAGES:
        (root / person).mkdir(exist_ok=True)
        shutil.copy(cfp / person / view / f"{name}.jpg", root / person / f"{view}_{name}.jpg")
    (root / "002" / "broken.jpg").write_bytes((cfp / "003" / "frontal" / "01.jpg").read_bytes()[:2000])
    return root


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (run state included) by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


CONFIG = AlignConfig()
ALIGN_ARGS = dict(batch_size=2, chunk_size=3, progress=False)


def run_align_ray(config, source, out_dir, options=RayOptions(), sink_kind="dir", batch_size=8, chunk_size=256,
                  progress=True):
    """``run_align`` on the Ray engine: the command's ``run_job(AlignJob(...), engine="ray")``."""
    with AlignJob(config, source, out_dir, sink_kind, batch_size=batch_size, chunk_size=chunk_size) as job:
        return run_job(job, "ray", progress=progress, options=options)


@pytest.fixture(scope="module")
def local_aligned(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local_aligned")
    summary = run_align(CONFIG, directory_source(images), out, workers=0, **ALIGN_ARGS)
    assert summary.counts == {"ok": 7, "no_face": 0, "error": 1}
    return out


def test_align_cli_on_ray_equals_local_engine(ray_cluster, images, local_aligned, tmp_path):
    out = tmp_path / "ray"
    result = CliRunner().invoke(cli, ["align", str(images), "--out", str(out), "--engine", "ray", "--workers", "1",
                                      "--batch-size", "2", "--chunk-size", "3", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "8 images processed (0 already done)" in result.output
    expected = tree(local_aligned)
    assert tree(out) == expected  # crops, manifest, per-chunk parts and run.json: byte for byte
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    broken = next(row for row in rows if row["key"] == "002/broken.jpg")
    assert broken["status"] == "error" and broken["reason"] and broken["outputs"] == []
    assert sum(len(row["outputs"]) for row in rows) == 7


def test_align_on_ray_resumes_where_the_chunks_end(ray_cluster, images, local_aligned, tmp_path):
    out = tmp_path / "ray"
    shutil.copytree(local_aligned, out)
    # As if killed during chunk 1: its part (and outputs) missing, and an empty manifest at the end.
    (out / ".facepipe" / "parts" / "chunk-000001.parquet").unlink()
    chunk1 = [row for row in pq.read_table(local_aligned / ".facepipe" / "parts" / "chunk-000001.parquet").to_pylist()]
    for row in chunk1:
        for name in row["outputs"]:
            (out / name).unlink()
    (out / "manifest.parquet").unlink()
    summary = run_align_ray(CONFIG, directory_source(images), out, RayOptions(actors=1), **ALIGN_ARGS)
    assert (summary.processed, summary.skipped) == (len(chunk1), 8 - len(chunk1))
    assert tree(out) == tree(local_aligned)
    again = run_align_ray(CONFIG, directory_source(images), out, RayOptions(actors=1), **ALIGN_ARGS)
    assert (again.processed, again.skipped, again.crops_written) == (0, 8, 0)
    assert tree(out) == tree(local_aligned)


@dataclass
class CrashOnceSource:
    """A file source whose first read kills the worker process (as an OOM kill or a segfault would), once: the
    marker file outlives the process, so the restarted actor reads normally."""

    inner: object
    marker: str
    description: str = "crash once"

    def items(self) -> list[Item]:
        return self.inner.items()

    def read(self, item: Item) -> bytes:
        if not os.path.exists(self.marker):
            Path(self.marker).write_text("crashed")
            os._exit(1)
        return self.inner.read(item)


def test_align_on_ray_reads_and_writes_recordio_and_retries_after_an_actor_crash(ray_cluster, images, tmp_path):
    """A RecordIO input (the crops of a first run, re-detected on a padded copy) into a RecordIO output; the first
    read kills the actor, Ray restarts it and retries the batch."""
    from facepipe.pipeline.sources import RecordIOSource

    run_align(CONFIG, directory_source(images), tmp_path / "rec", sink_kind="recordio", workers=0, **ALIGN_ARGS)
    config = AlignConfig(retry_padded=True)
    rec = tmp_path / "rec" / "train.rec"
    local = run_align(config, RecordIOSource(rec), tmp_path / "local", sink_kind="recordio", workers=0, **ALIGN_ARGS)
    assert local.counts["ok"] >= 5  # tight crops: found again on the padded retry

    marker = tmp_path / "crashed"
    source = CrashOnceSource(RecordIOSource(rec), str(marker))
    options = RayOptions(actors=1, max_restarts=2)
    summary = run_align_ray(config, source, tmp_path / "ray", options, sink_kind="recordio", **ALIGN_ARGS)
    assert marker.read_text() == "crashed"  # the actor did die once
    assert summary.counts == local.counts
    assert tree(tmp_path / "ray") == tree(tmp_path / "local")  # train.rec / .idx / labels.tsv and the manifest


@pytest.fixture(scope="module")
def crops(local_aligned, tmp_path_factory) -> Path:
    """The aligned crops plus one unreadable crop (it must become an error row, not a failed job)."""
    root = tmp_path_factory.mktemp("crops") / "aligned"
    shutil.copytree(local_aligned, root)
    (root / "001" / "zz_unreadable.jpg").write_bytes(b"not a jpeg")
    return root


def test_embed_cli_on_ray_equals_local_engine_and_resumes(ray_cluster, crops, tmp_path):
    def embed(out: Path, *engine: str) -> str:
        result = CliRunner().invoke(cli, ["embed", str(crops), "--out", str(out), "--batch-size", "2", "--shard-size", "3",
                                          "--no-progress", *engine])
        assert result.exit_code == 0, result.output
        return result.output

    local, out = tmp_path / "local", tmp_path / "ray"
    embed(local)
    output = embed(out, "--engine", "ray", "--actors", "1")
    assert "8 crops: 8 embedded now" in output and "1 unreadable" in output
    assert tree(out) == tree(local)  # .npy shards, parquet parts, manifest, run.json
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [row["status"] for row in manifest].count("error") == 1
    assert np.isfinite([row["det_score"] for row in manifest if row["status"] == "ok"]).all()

    (out / "shards" / "emb-000001.parquet").unlink()  # shard 1 unfinished: only it is embedded again
    (out / "manifest.parquet").unlink()
    assert "8 crops: 3 embedded now" in embed(out, "--engine", "ray", "--actors", "1")
    assert tree(out) == tree(local)


def test_ijbc_features_on_ray_equal_local_engine(ray_cluster, images, local_aligned, tmp_path):
    from facepipe.commands.eval_ijbc import run_feature_job
    from facepipe.evaluation import ijbc_features as ijbc
    from facepipe.evaluation.ijbc_layout import IJBLayout

    rows = pq.read_table(local_aligned / "manifest.parquet").to_pylist()
    root = tmp_path / "ijb"
    (root / "loose_crop").mkdir(parents=True)
    names, landmarks, faceness = [], [], []
    for row in rows:
        name = row["key"].replace("/", "_")
        shutil.copy(images / row["key"], root / "loose_crop" / name)
        names.append(name)
        landmarks.append(np.reshape(row["landmarks"][0], (5, 2)) if row["landmarks"] else np.zeros((5, 2)))
        faceness.append(row["scores"][0] if row["scores"] else 0.0)
    n = len(names)
    layout = IJBLayout(
        root=root, target="IJBC", image_names=np.array(names), templates=np.arange(n), medias=np.arange(n),
        landmarks=np.asarray(landmarks, dtype=np.float32), faceness=np.asarray(faceness, dtype=np.float32),
        pair_t1=np.array([0]), pair_t2=np.array([1]), labels=np.array([1], dtype=np.int8),
    )
    extractor = ijbc.FeatureExtractor(model="mobilefacenet", detector="retinaface")
    key = extractor.cache_key(layout)
    with pytest.warns(UserWarning, match="002_broken.jpg unreadable"):
        local = run_feature_job(ijbc.IJBFeatureJob(layout, ijbc.FeatureCache(tmp_path / "local", key, n, shard_size=3), extractor,
                                                   batch_size=2), "local", progress=False)
    on_ray = run_feature_job(ijbc.IJBFeatureJob(layout, ijbc.FeatureCache(tmp_path / "ray", key, n, shard_size=3), extractor,
                                                batch_size=2), "ray", RayOptions(actors=1), progress=False)
    assert on_ray.complete and on_ray.num_shards == 3
    assert tree(tmp_path / "ray") == tree(tmp_path / "local")
    flags = local.flags()
    assert flags[names.index("002_broken.jpg")] == ijbc.FLAG_UNREADABLE and (np.delete(flags, names.index("002_broken.jpg")) == 0).all()


def test_missing_ray_gives_the_install_hint(monkeypatch, images, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError, as when not installed
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(RayUnavailableError, match=r"pip install 'facepipe\[ray\]'"):
        import_ray()
    with pytest.raises(RayUnavailableError):
        run_align_ray(CONFIG, directory_source(images), tmp_path / "out")
    for command in (["align", str(images), "--out", str(tmp_path / "a")], ["embed", str(images), "--out", str(tmp_path / "e")]):
        result = CliRunner().invoke(cli, [*command, "--engine", "ray"])
        assert result.exit_code != 0 and RAY_INSTALL_HINT in result.output, result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "e").exists()  # nothing started, nothing written


def test_ray_flags_need_the_ray_engine(images, tmp_path):
    result = CliRunner().invoke(cli, ["align", str(images), "--out", str(tmp_path / "a"), "--num-gpus", "1"])
    assert result.exit_code == 2 and "--num-gpus: only with --engine ray" in result.output
    result = CliRunner().invoke(cli, ["embed", str(images), "--out", str(tmp_path / "e"), "--actors", "2"])
    assert result.exit_code == 2 and "--actors only applies to --engine ray" in result.output
    with pytest.raises(ValueError, match="at least 1 actor"):
        RayOptions(actors=0)


def test_actor_pool_sizing_from_cluster_resources():
    from facepipe.engine.ray_engine import RayEngineError, resolve_actors

    cpu_only = {"CPU": 2.0, "memory": 8e9}
    plan = resolve_actors(cpu_only, RayOptions())
    assert (plan.actors, plan.num_gpus, plan.device, plan.threads) == (1, 0.0, "cpu", 1)  # one CPU left to Ray Data
    assert resolve_actors({"CPU": 64.0}, RayOptions(num_cpus=4)).actors == 15
    assert resolve_actors({"CPU": 64.0}, RayOptions(num_cpus=4)).threads == 4
    gpus = {"CPU": 64.0, "GPU": 8.0}
    plan = resolve_actors(gpus, RayOptions())
    assert (plan.actors, plan.num_gpus, plan.device) == (16, 0.5, "cuda")  # two actors per GPU by default
    assert resolve_actors(gpus, RayOptions(num_gpus=1)).actors == 8
    assert resolve_actors(gpus, RayOptions(num_gpus=0)).device == "cpu"
    assert resolve_actors(gpus, RayOptions(num_gpus=0.25, actors=3)).actors == 3
    with pytest.raises(RayEngineError, match="has no GPUs"):
        resolve_actors(cpu_only, RayOptions(num_gpus=1))


def test_wrong_ray_address_fails_fast():
    from facepipe.engine.ray_engine import RayEngineError, check_address

    with pytest.raises(RayEngineError, match="no Ray cluster answers at 127.0.0.1:1"):
        check_address("127.0.0.1:1")
    with pytest.raises(RayEngineError, match="expected HOST:PORT"):
        check_address("nonsense")
    check_address("auto")  # Ray's own discovery of a local `ray start --head`
    check_address(None)
