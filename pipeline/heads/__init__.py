"""Stage-two heads: the DrCT1 primary network, the APS network, knowledge fusion (paper V) and the
baselines every DrCT figure is compared with. Import the modules themselves (`pipeline.heads.build`):
this package imports nothing, so `pipeline.heads.names` stays light for the CLI."""
