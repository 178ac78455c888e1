"""tensadapt: tensor-based parameter-efficient fine-tuning of transformers.

A factorisation (LoRA, CP, Tucker, Tensor-Train, or a registered one) composed with a
tensorisation (a list of modes: per-layer, ``qkv``, ``depth``, ``heads``, ``slices``, fused
``"depth*qkv"``) describes one adapter; published methods are configurations of it.
"""

__version__ = "0.1.0"

from . import gemm, presets
from .budget import count_parameters
from .config import GroupConfig, TensorAdapterConfig
from .contraction import clear_plan_cache, plan_cache_info
from .errors import (
    AdapterStateError,
    CheckpointError,
    ConfigError,
    ModeError,
    TargetResolutionError,
    TensadaptError,
    UnknownNameError,
)
from .factorizations import (
    CP,
    FactorizedTensor,
    InitSpec,
    LoRA,
    TensorTrain,
    Tucker,
    list_factorizations,
    register_factorization,
)
from .layers import TensorAdapterLayer
from .model import TensorAdapterModel, get_adapter_model
from .modes import FeatureMode, Mode, Piece, StructuralMode, list_modes, register_mode
from .rank_solver import RankSolution, apply_rank, solve_ranks
from .resolve import Resolution, resolve_targets
from .targets import Target

__all__ = [
    "__version__",
    "TensorAdapterConfig",
    "GroupConfig",
    "get_adapter_model",
    "TensorAdapterModel",
    "TensorAdapterLayer",
    "resolve_targets",
    "Resolution",
    "Target",
    "count_parameters",
    "solve_ranks",
    "apply_rank",
    "RankSolution",
    "presets",
    "gemm",
    "register_factorization",
    "list_factorizations",
    "FactorizedTensor",
    "InitSpec",
    "LoRA",
    "CP",
    "Tucker",
    "TensorTrain",
    "register_mode",
    "list_modes",
    "Mode",
    "StructuralMode",
    "FeatureMode",
    "Piece",
    "plan_cache_info",
    "clear_plan_cache",
    "TensadaptError",
    "ConfigError",
    "UnknownNameError",
    "TargetResolutionError",
    "ModeError",
    "AdapterStateError",
    "CheckpointError",
]
