"""The `drct` command: one click group; each stage module contributes its subcommand."""

from __future__ import annotations

import importlib
import importlib.util

import click

from pipeline import __version__

# (module, attribute) of every subcommand; modules are imported lazily so that `drct --help`
# stays fast and a stage never imports another stage's heavy dependencies.
SUBCOMMANDS = {
    "phantom": ("stages.phantom", "phantom"),
    "adapt": ("stages.adapt", "adapt"),
    "extract": ("stages.extract", "extract"),
    "cache": ("stages.cache_cmd", "cache"),
    "train": ("stages.train", "train"),
    "evaluate": ("stages.evaluate", "evaluate"),
    "report": ("stages.report", "report"),
    "predict": ("stages.predict", "predict"),
    "export": ("stages.export", "export"),
    "interpret": ("stages.interpret", "interpret_cmd"),
    "sweep": ("stages.sweep", "sweep"),
    "doctor": ("stages.doctor", "doctor"),
    "fingerprint": ("stages.fingerprint", "fingerprint"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name, (module, _) in SUBCOMMANDS.items() if importlib.util.find_spec(module)]

    def get_command(self, ctx, name):
        if name not in SUBCOMMANDS:
            return None
        module_name, attribute = SUBCOMMANDS[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                return None
            raise
        return getattr(module, attribute)

    def resolve_command(self, ctx, args):
        if args and not args[0].startswith("-") and args[0] not in SUBCOMMANDS:
            from stages.options import did_you_mean

            ctx.fail(f"No such command '{args[0]}'{did_you_mean(args[0], SUBCOMMANDS)}; `drct --help` lists them.")
        return super().resolve_command(ctx, args)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="drct")
def main():
    """DrCT2 brain-CT diagnosis with zoom-in attention, as a two-stage feature-cache pipeline.

    \b
    Optional:   drct adapt     lesion-aware VGG16: block 5 tuned on slice labels of other scans
    Stage one:  drct extract   DICOM -> frozen VGG16 at two resolutions -> HDF5 feature cache
                drct cache     info / verify a feature cache
    Stage two:  drct train     attention/BiGRU/APS/fusion heads on cached vectors only
    Then:       drct evaluate  metrics of a run     drct interpret  key slices (Tables 5-6)
                drct sweep     m_key sweep (Fig. 6) drct report     per-scan decision-support pages
                drct predict   new DICOM series     drct export     cached vectors to npz/parquet/h5
    Demo data:  drct phantom   synthetic head CTs written as real DICOM
    DVC:        drct fingerprint  the code and config the expensive stages depend on

    Every command that reads a config takes --config FILE and --set KEY=VALUE; every command
    with a progress bar takes --progress/--no-progress.
    """


if __name__ == "__main__":
    main()
