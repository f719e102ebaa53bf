"""The NTK engine: pure PyTorch, no Lightning.

``empirical_ntk`` / ``layerwise_ntk`` dispatch each parameterised layer either to a
structured per-layer rule (:mod:`.structured`) or to the exact generic torch.func path
(:mod:`.generic`).
"""
from .api import Explanation, empirical_ntk, layerwise_ntk, model_outputs
from .distributed import Communicator, TorchDistributedComm
from .errors import NTKError
from .finite_step import finite_difference_ntk
from .modes import AllPairs, DiagonalPairs, KernelMode, mode_names, register_mode
from .spectrum import NormEstimate, ntk_spectrum, ntk_spectrum_and_norms, ntk_trace_estimate
from .structured import (
    BatchNormTerm,
    Call,
    ConvTerm,
    OuterTerm,
    Rule,
    ScaleTerm,
    SumTerm,
    TokenTerm,
    register_rule,
)

__all__ = ["NTKError", "Explanation", "empirical_ntk", "finite_difference_ntk", "layerwise_ntk",
           "ntk_spectrum", "ntk_trace_estimate", "ntk_spectrum_and_norms", "NormEstimate",
           "Communicator",
           "TorchDistributedComm",
           "model_outputs", "register_rule", "Rule", "Call", "OuterTerm", "TokenTerm",
           "ConvTerm", "SumTerm", "ScaleTerm", "BatchNormTerm", "KernelMode", "DiagonalPairs",
           "AllPairs", "register_mode", "mode_names"]
