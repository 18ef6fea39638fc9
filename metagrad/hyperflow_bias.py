"""Deprecated alias of :mod:`metagrad.hyperflow.bias` (the module moved into the ``hyperflow`` package)."""

import sys
import warnings

from .hyperflow import bias

warnings.warn("metagrad.hyperflow_bias moved to metagrad.hyperflow.bias; import it from there.",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = bias
