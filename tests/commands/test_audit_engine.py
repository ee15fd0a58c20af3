"""``facepipe audit --engine``: the option is checked at the command boundary (one line, no traceback)."""

from __future__ import annotations

from click.testing import CliRunner

from facepipe.cli import main


def test_ray_address_without_the_ray_engine_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["audit", str(tmp_path), "--out", str(tmp_path / "o"), "--ray-address", "auto"])
    assert result.exit_code == 2 and "--ray-address: only with --engine ray" in result.output
    assert "Traceback" not in result.output


def test_engine_is_one_of_local_or_ray(tmp_path):
    result = CliRunner().invoke(main, ["audit", str(tmp_path), "--out", str(tmp_path / "o"), "--engine", "spark"])
    assert result.exit_code == 2 and "'spark' is not one of 'local', 'ray'" in result.output
