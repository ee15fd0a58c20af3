import json

import torch
from click.testing import CliRunner

from facepipe.cli import main
from facepipe.train.data import read_annotations, write_jsonl
from tests.conftest import shared_path


def test_train_retinaface_cli_runs_resumes_and_refuses_to_overwrite(tmp_path):
    root = shared_path("widerface", "val_images")
    samples = read_annotations("wider-mat", shared_path("widerface", "wider_face_val.mat"), root)[:2]
    data = tmp_path / "train.jsonl"
    write_jsonl(samples, data, root)
    out = tmp_path / "run"
    args = ["train", "retinaface", "--data", str(data), "--format", "jsonl", "--images", str(root), "--out", str(out),
            "--image-size", "64", "--batch-size", "2", "--threads", "1"]
    runner = CliRunner()
    first = runner.invoke(main, args + ["--epochs", "1"])
    assert first.exit_code == 0, first.output
    summary = json.loads(first.output.strip().splitlines()[-1])
    assert summary["final_weights"] == str(out / "final.pth")
    assert json.loads((out / "config.json").read_text())["lr_steps"] == [1, 1]  # 190/250, 220/250 of 1 epoch
    assert len(torch.load(out / "final.pth", weights_only=True)) == 300

    again = runner.invoke(main, args + ["--epochs", "1"])
    assert again.exit_code != 0 and "--resume" in again.output

    resumed = runner.invoke(main, args + ["--epochs", "2", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming at epoch 2" in resumed.output
    assert (out / "weights" / "epoch_002.pth").is_file()
    assert len((out / "epochs.csv").read_text().splitlines()) == 3


def test_train_retinaface_cli_errors_and_help(tmp_path):
    runner = CliRunner()
    help_text = runner.invoke(main, ["train", "retinaface", "--help"]).output
    assert "mesh" in help_text and "--negpos" in help_text
    label = tmp_path / "label.txt"
    label.write_text("1 2 3 4\n")
    result = runner.invoke(main, ["train", "retinaface", "--data", str(label), "--images", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "before the first" in result.output
    result = runner.invoke(main, ["train", "retinaface", "--data", str(label), "--images", str(tmp_path),
                                  "--out", str(tmp_path / "o"), "--image-size", "100"])
    assert result.exit_code != 0 and "multiple of 32" in result.output
