"""Options every stage command shares, so that the CLI has one style.

* ``--set KEY=VALUE`` (repeatable) on every command that reads a config: any config value, the
  value parsed as YAML; unknown keys are refused with a "did you mean" (pipeline.config).
* ``--progress/--no-progress`` on every command with a progress bar (``--quiet`` is a hidden alias
  of ``--no-progress`` kept for old scripts).
* ``StageError``: a refusal of bad input, message on stderr, exit code 2, no traceback. Every
  command refuses with it; exit 1 is kept for a check that ran and found problems (cache verify,
  doctor, a report with every scan failed), as the README's exit-code line says.
* ``guess_layout``: the dataset layout of a DICOM tree from its file names, with the reason;
  ``LayoutOption``: a --layout whose help describes each registered layout.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import click


class StageError(click.ClickException):
    """A clean refusal: message on stderr, exit code 2, no traceback."""

    exit_code = 2


def did_you_mean(value: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class SuggestingChoice(click.Choice):
    """click.Choice whose error names the closest valid value."""

    def convert(self, value, param, ctx):
        if value in self.choices:
            return value
        self.fail(f"{value!r} is not one of {', '.join(map(repr, self.choices))}{did_you_mean(value, self.choices)}",
                  param, ctx)


def _quiet(ctx: click.Context, _param, value: bool) -> None:
    if value:
        ctx.meta["drct.quiet"] = True
        if "progress" in ctx.params:
            ctx.params["progress"] = False


def _progress(ctx: click.Context, _param, value: bool) -> bool:
    return False if ctx.meta.get("drct.quiet") else value


def progress_option(function):
    """--progress/--no-progress (default on: bars with rate and ETA on stderr, also under DVC)."""
    function = click.option("--quiet", is_flag=True, hidden=True, expose_value=False, callback=_quiet,
                            help="Same as --no-progress.")(function)
    return click.option("--progress/--no-progress", default=True, show_default=True, callback=_progress,
                        help="Progress bars with rate and ETA on stderr.")(function)


def set_option(function):
    """--set KEY=VALUE, repeatable; parse with `parse_settings`."""
    return click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
                        help="Any config value, e.g. --set model.m_key=8 (value parsed as YAML; repeatable).")(function)


def parse_settings(items) -> dict:
    """('a.b=1', 'c.d=x') -> {'a.b': 1, 'c.d': 'x'}; a malformed item is a StageError."""
    import yaml

    from pipeline.config import safe_yaml

    settings = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise StageError(f"--set expects KEY=VALUE, got '{item}'")
        try:
            settings[key.strip()] = safe_yaml(value)
        except yaml.YAMLError as exc:
            raise StageError(f"--set {item}: the value is not valid YAML ({exc})") from None
    return settings


def load_stage_config(config_path, overrides: dict, settings=()) -> dict:
    """load_config(config_path, flags + --set values) with errors as StageError (exit code 2)."""
    from pipeline.config import ConfigError, load_config

    merged = {**parse_settings(settings), **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return load_config(config_path, merged)
    except ConfigError as exc:
        raise StageError(str(exc)) from None


def guess_layout(root: str | Path) -> tuple[str, str]:
    """(layout, why) of a DICOM tree: the first registered layout (pipeline/data/layouts.py) whose
    `detect` recognises it (CQ500 by its reads.csv / 'CQ500CT' folders, RSNA by its
    stage_2_train.csv / flat ID_*.dcm files), else a plain folder of series."""
    from pipeline.data import layouts

    return layouts.guess(root)


class LayoutOption(click.Option):
    """A --layout option whose help ends with each choice's one-line `Layout.help`, read from the
    layout modules only when the help is shown (`drct` starts without importing the readers)."""

    def get_help_record(self, ctx):
        from pipeline.data import layouts

        told = self.help
        self.help = f"{told} " + "; ".join(f"{name}: {layouts.get(name).help}" for name in self.type.choices) + "."
        try:
            return super().get_help_record(ctx)
        finally:
            self.help = told


def config_sets(config_path, dotted: str) -> bool:
    """Whether the YAML file at config_path (None: no file) sets the dotted key itself."""
    if config_path is None:
        return False
    from pipeline.config import read_yaml, sets_key

    return sets_key(read_yaml(config_path), dotted)
