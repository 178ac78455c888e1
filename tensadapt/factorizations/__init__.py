"""Factorisations of adapter tensors: LoRA, CP, Tucker, Tensor-Train, and user ones."""

from .base import (
    FACTORIZATIONS,
    FactorizedTensor,
    InitSpec,
    get_factorization,
    list_factorizations,
    register_factorization,
)
from .cp import CP
from .lora import LoRA
from .tt import TensorTrain
from .tucker import Tucker

__all__ = [
    "FACTORIZATIONS",
    "FactorizedTensor",
    "InitSpec",
    "get_factorization",
    "list_factorizations",
    "register_factorization",
    "CP",
    "LoRA",
    "TensorTrain",
    "Tucker",
]
