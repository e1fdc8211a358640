"""compress: post-training compression of large language models.

    import compress
    model, report = compress.run(model, [compress.Wanda(sparsity=0.5, pattern="2:4")], calib=ids)
"""
from compress.api import run  # noqa: F401
from compress.checkpoint import load, save  # noqa: F401
from compress.errors import CompressError  # noqa: F401
from compress.passes import AWQ, Armor, DSnoT, GQSA, Magnitude, Perp, Quant, SparseGPT, Wanda  # noqa: F401
from compress.passes import (AWQConfig, ArmorConfig, DSnoTConfig, GQSAConfig, MagnitudeConfig, PerpConfig, QuantConfig, SparseGPTConfig,  # noqa: F401
                             WandaConfig)

__version__ = "0.1.0"
