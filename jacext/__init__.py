"""jacext: fused, exact Jacobian objectives for MLPs (compiled CPU and CUDA ops)."""
from . import ops
from . import flows, targetprop
from .activations import SmoothLeakyReLU
from .functional import (METHODS, Jacobian, JacobianFrobenius, JacobianGram, jacobian, jacobian_frobenius, jacobian_gram,
                         random_projections)
from .laplacian import divergence, jacobian_diagonal, laplacian
from .margin import LargeMarginLoss, large_margin_loss, margin_distances
from .nn import MLP, parse_model
from .explain import explain
from .frontend import NotLowerable
from .spectral import jacobian_spectral_norm
from .workspace import release_workspace, set_workspace_limit, workspace_stats

__version__ = "0.1.0"
__all__ = ["MLP", "SmoothLeakyReLU", "jacobian_frobenius", "JacobianFrobenius", "jacobian", "Jacobian", "jacobian_gram",
           "JacobianGram", "ops",
           "parse_model", "random_projections", "explain", "METHODS", "margin_distances", "large_margin_loss",
           "LargeMarginLoss", "flows", "targetprop", "workspace_stats", "set_workspace_limit", "release_workspace",
           "jacobian_spectral_norm", "laplacian", "divergence", "jacobian_diagonal", "NotLowerable"]
