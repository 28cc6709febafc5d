"""Stage-two heads: the DrCT1 primary network, the APS network, knowledge fusion (paper V) and the
baselines every DrCT figure is compared with; `registry` lists them, `head` says what a head is.
Import the modules themselves (`pipeline.heads.build`): this package imports nothing, so
`pipeline.heads.registry` stays light for the CLI and the config schema."""
