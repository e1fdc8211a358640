"""Runtime modules: what a compressed layer becomes in the saved and loaded model."""
from compress.nn.base import RUNTIME, PackedLinear  # noqa: F401
from compress.nn.quant_linear import QuantLinear  # noqa: F401
from compress.nn.gqsa_linear import GQSALinear  # noqa: F401
from compress.nn.armor_linear import ArmorLinear  # noqa: F401
from compress.nn.sparse_quant_linear import SparseQuantLinear  # noqa: F401
