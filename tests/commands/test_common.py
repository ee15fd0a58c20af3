"""One spelling per meaning across commands; the old spellings still work but are hidden from --help."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from facepipe.cli import main
from facepipe.commands.common import AliasedOption
from facepipe.models.checkpoint import cache_dir


def _commands(group: click.Group, ctx: click.Context, prefix: str = "") -> dict[str, click.Command]:
    found = {}
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group):
            found.update(_commands(command, click.Context(command, parent=ctx), f"{prefix}{name} "))
        elif command is not None:
            found[f"{prefix}{name}"] = command
    return found


COMMANDS = _commands(main, click.Context(main))

# The commands that filter faces by score or load a detector, each under the new spelling.
MIN_SCORE = {"detect", "align", "embed", "index search", "eval cfp", "eval lfw", "eval compare-detectors", "eval quality"}
DETECTOR_WEIGHTS = {"detect", "align", "embed", "index search", "eval cfp", "eval lfw", "eval widerface", "eval ijbc", "eval quality"}
OLD_SPELLINGS = {"--threshold": "min_score", "--weights": "detector_weights"}


def _option(command: click.Command, name: str) -> click.Option | None:
    return next((p for p in command.params if isinstance(p, click.Option) and p.name == name), None)


def test_each_meaning_has_one_spelling_in_every_command() -> None:
    for name, command in COMMANDS.items():
        min_score, detector_weights = _option(command, "min_score"), _option(command, "detector_weights")
        assert (min_score is not None) == (name in MIN_SCORE), name
        assert (detector_weights is not None) == (name in DETECTOR_WEIGHTS), name
        if min_score is not None:
            assert min_score.opts[0] == "--min-score", name
        if detector_weights is not None:
            assert detector_weights.opts[0] == "--detector-weights", name
        threshold = [p for p in command.params if "--threshold" in getattr(p, "opts", ())]
        assert all(p.name == "min_score" for p in threshold), f"{name}: --threshold means something else"
        weights = _option(command, "weights")
        if weights is not None:  # --weights, where visible, is the embedding model's
            assert "--model" in {o for p in command.params for o in getattr(p, "opts", ())}, name


@pytest.mark.parametrize("name", sorted(MIN_SCORE))
def test_new_and_old_score_spellings_parse_to_the_same_value(name: str) -> None:
    command = COMMANDS[name]
    for spelling in ("--min-score", "--threshold"):
        ctx = command.make_context(name, [spelling, "0.25"], resilient_parsing=True)
        assert ctx.params["min_score"] == pytest.approx(0.25), (name, spelling)


def test_detect_accepts_both_detector_weights_spellings(tmp_path) -> None:
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    for spelling in ("--detector-weights", "--weights"):
        ctx = COMMANDS["detect"].make_context("detect", [spelling, str(weights)], resilient_parsing=True)
        assert ctx.params["detector_weights"] == str(weights)


@pytest.mark.parametrize("name", sorted(MIN_SCORE | DETECTOR_WEIGHTS))
def test_help_shows_only_the_new_spellings(name: str) -> None:
    args = name.split() + ["--help"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    hidden = [o for p in COMMANDS[name].params if isinstance(p, AliasedOption) for o in p.hidden_aliases]
    for old in hidden:
        assert old not in result.output, (name, old)
    if name in MIN_SCORE:
        assert "--min-score" in result.output and "--threshold" not in result.output
    if name in DETECTOR_WEIGHTS:
        assert "--detector-weights" in result.output


def test_cache_folder_is_facepipe_home_with_the_old_name_as_fallback(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("FACEPIPE_HOME", raising=False)
    monkeypatch.setenv("FACEPIPE_CACHE", str(tmp_path / "old"))
    assert cache_dir() == tmp_path / "old"
    monkeypatch.setenv("FACEPIPE_HOME", str(tmp_path / "new"))
    assert cache_dir() == tmp_path / "new"
