"""The ``facepipe`` command line. Subcommands are imported only when invoked, so ``--help`` is instant."""

from __future__ import annotations

import importlib

import click


class LazyGroup(click.Group):
    """A click group whose subcommands live in other modules.

    ``lazy_commands`` maps ``name -> ("module:attribute", short help)``; the help listing uses the short help so
    that ``facepipe --help`` imports neither torch nor any command module.
    """

    def __init__(self, *args, lazy_commands: dict[str, tuple[str, str]] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_commands))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy_commands:
            module_name, attribute = self.lazy_commands[name][0].split(":")
            return getattr(importlib.import_module(module_name), attribute)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in self.lazy_commands:
                rows.append((name, self.lazy_commands[name][1]))
            else:
                command = super().get_command(ctx, name)
                rows.append((name, command.get_short_help_str() if command else ""))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(
    cls=LazyGroup,
    lazy_commands={
        "detect": ("facepipe.commands.detect:detect", "Detect faces in images; one JSON line per image."),
        "align": ("facepipe.commands.align:align", "Detect and align faces over a whole data set."),
        "audit": ("facepipe.commands.audit:audit", "Find label noise, duplicate identities, copies and test overlap in a training set."),
        "embed": ("facepipe.commands.embed:embed", "Embed aligned crops (any align sink), or raw photos with --detect, into sharded .npy files."),
        "index": ("facepipe.commands.index:index", "Build and search FAISS galleries of embeddings."),
        "models": ("facepipe.commands.models:models", "List model architectures and input contracts."),
        "quantize": ("facepipe.commands.quantize:quantize", "Calibrate an int8 embedder on your own face crops."),
        "train": ("facepipe.commands.train:train", "Train detectors (RetinaFace)."),
    },
)
@click.version_option(package_name="facepipe")
def main() -> None:
    """facepipe: detect, align and embed faces; evaluate face recognition."""


@main.group(
    cls=LazyGroup,
    lazy_commands={
        "widerface": ("facepipe.commands.eval_widerface:widerface", "WIDER FACE easy/medium/hard AP."),
        "verify": ("facepipe.commands.eval_verification:verify", "10-fold verification on an insightface .bin."),
        "cfp": ("facepipe.commands.eval_verification:cfp", "CFP-FF / CFP-FP from raw images."),
        "lfw": ("facepipe.commands.eval_verification:lfw", "LFW from raw images and pairs.txt."),
        "compare-detectors": (
            "facepipe.commands.eval_verification:compare_detectors",
            "Same embedder behind MTCNN, RetinaFace, SCRFD... (RetinaFace paper, Table 4), accumulated.",
        ),
        "ijbc": ("facepipe.commands.eval_ijbc:ijbc", "IJB-C / IJB-B 1:1 TAR@FAR, or 1:N CMC and TPIR@FPIR, with templates."),
        "identify": ("facepipe.commands.eval_identify:identify", "1:N identification (CMC, TPIR@FPIR) on embedding folders."),
        "quality": ("facepipe.commands.eval_quality:quality", "Error-versus-reject curves of face quality measures."),
    },
    name="eval",
)
def eval_group() -> None:
    """Evaluate detection (WIDER FACE) and recognition (LFW, CFP, AgeDB .bin, IJB-C)."""


if __name__ == "__main__":
    main()
