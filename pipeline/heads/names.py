"""The names of the heads `model.name` can select (no torch import: the CLI lists them in --help)."""

DRCT_MODELS = ("drct1", "drct2")
BASELINES = ("pooled_logistic", "meanpool", "abmil")  # issue 15: what every DrCT figure is compared with
MODELS = DRCT_MODELS + BASELINES
