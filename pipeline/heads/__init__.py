"""Stage-two heads: the DrCT1 primary network, the APS network and knowledge fusion (paper V)."""

from pipeline.heads.build import build_model, predict  # noqa: F401
from pipeline.heads.drct2 import DrCT  # noqa: F401
