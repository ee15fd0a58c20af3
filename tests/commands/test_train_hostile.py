import csv
import json

import pytest
import torch
from click.testing import CliRunner

from facepipe.cli import main
from facepipe.train.data import read_annotations, write_jsonl
from tests.conftest import shared_path


@pytest.fixture
def train_args(tmp_path):
    root = shared_path("widerface", "val_images")
    samples = read_annotations("wider-mat", shared_path("widerface", "wider_face_val.mat"), root)[:2]
    data = tmp_path / "train.jsonl"
    write_jsonl(samples, data, root)
    return ["train", "retinaface", "--data", str(data), "--format", "jsonl", "--images", str(root),
            "--out", str(tmp_path / "run"), "--image-size", "64", "--batch-size", "1", "--threads", "1"]


def test_epochs_are_numbered_from_one_in_every_log(tmp_path, train_args):
    result = CliRunner().invoke(main, train_args + ["--epochs", "2", "--checkpoint-every", "1"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    with open(run / "epochs.csv") as f:
        assert [int(float(row["epoch"])) for row in csv.DictReader(f)] == [1, 2]
    logged = [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert sorted(set(logged)) == [1, 2]
    assert json.loads(result.output.strip().splitlines()[-1])["last_epoch"]["epoch"] == 2
    assert sorted(p.name for p in (run / "weights").iterdir()) == ["epoch_000.pth", "epoch_001.pth", "epoch_002.pth"]


@pytest.mark.parametrize(
    "damage", [b"", b"garbage, not a checkpoint" * 10, "truncate", "wrong-content"],
    ids=["empty", "garbage", "truncated", "not-a-resume-dict"],
)
def test_corrupt_resume_file_gives_one_line(tmp_path, train_args, damage):
    first = CliRunner().invoke(main, train_args + ["--epochs", "1"])
    assert first.exit_code == 0, first.output
    resume = tmp_path / "run" / "resume.pt"
    if damage == "truncate":
        resume.write_bytes(resume.read_bytes()[:5000])
    elif damage == "wrong-content":
        torch.save({"config": {"backbone": "mobilenet0.25"}, "model": {"x": torch.zeros(2)}}, resume)
    else:
        resume.write_bytes(damage)
    result = CliRunner().invoke(main, train_args + ["--epochs", "2", "--resume"])
    assert result.exit_code == 1 and not isinstance(result.exception, (RuntimeError, KeyError, EOFError))
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "resume.pt" in error[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("device", ["bogus", "cuda:x", "gpu", "cuda:99"])
def test_bogus_device_gives_one_usage_line(train_args, device):
    result = CliRunner().invoke(main, train_args + ["--epochs", "1", "--device", device])
    assert result.exit_code == 2 and "--device" in result.output and "Traceback" not in result.output
