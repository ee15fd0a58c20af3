from click.testing import CliRunner

from facepipe.cli import main
from tests.conftest import shared_path

KEY = "12--Group/12_Group_Group_12_Group_Group_12_28"


def _run(*args: str):
    return CliRunner().invoke(main, ["eval", "widerface", *args])


def test_damaged_prediction_folder_gives_one_line(tmp_path):
    gt = shared_path("widerface")
    predictions = tmp_path / "pred"
    (predictions / "12--Group").mkdir(parents=True)
    prediction = predictions / f"{KEY}.txt"
    prediction.write_text(f"{KEY.split('/')[1]}\n1\n10 10 20 20 0.9\n")
    (predictions / "facepipe_run.json").write_bytes(b"{broken")
    args = ("--gt", str(gt), "--predictions", str(predictions), "--out", str(tmp_path / "r.json"))
    result = _run(*args)
    assert result.exit_code == 1 and "facepipe_run.json: not a readable run description" in result.output
    (predictions / "facepipe_run.json").unlink()
    prediction.write_text(f"{KEY.split('/')[1]}\n1\n10 10 inf 20 0.9\n")
    result = _run(*args)
    assert result.exit_code == 1 and ".txt:3: NaN or infinite" in result.output, result.output
    prediction.write_bytes(b"name\n1\n10 10 20 20 0.\xff\n")
    result = _run(*args)
    assert result.exit_code == 1 and "line 3: not UTF-8" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "r.json").exists()
