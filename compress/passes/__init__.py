"""The pass registry: one file per algorithm; importing it registers the pass."""
from compress.passes.base import REGISTRY, Layer, PassConfig, make_config  # noqa: F401
from compress.passes.magnitude import Magnitude, MagnitudeConfig  # noqa: F401
from compress.passes.wanda import Wanda, WandaConfig  # noqa: F401
from compress.passes.sparsegpt import SparseGPT, SparseGPTConfig  # noqa: F401
from compress.passes.dsnot import DSnoT, DSnoTConfig  # noqa: F401
from compress.passes.armor import Armor, ArmorConfig  # noqa: F401
from compress.passes.quant import Quant, QuantConfig  # noqa: F401
from compress.passes.gqsa import GQSA, GQSAConfig  # noqa: F401
from compress.passes.perp import Perp, PerpConfig  # noqa: F401
from compress.passes.awq import AWQ, AWQConfig  # noqa: F401
