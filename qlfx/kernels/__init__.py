"""TE/TIR kernels of fused ops and their tuning.

``branch_product``: conv2d(x, Wa) * conv2d(x, Wb) fused into one kernel (pointwise and depthwise
kinds), with hand schedules for llvm and cuda; ``tuning``: MetaSchedule search over the hand
schedule's knobs with a persistent JSON database. Importing this package imports TVM.
"""

from .branch_product import (
    WEIGHT_BLOCK,
    BranchProductKernel,
    BranchProductSpec,
    CudaKnobs,
    LlvmKnobs,
    branch_product_primfunc,
    build_branch_product,
    cuda_target,
    default_llvm_knobs,
    host_llvm_target,
    llvm_knob_choices,
    pack_weights,
    reference_numpy,
    schedule_branch_product,
    schedule_cuda,
    schedule_llvm,
)
from .tuning import TunedKernel, TuningDatabaseError, open_database, tune_branch_product

__all__ = [
    "WEIGHT_BLOCK",
    "BranchProductKernel",
    "BranchProductSpec",
    "CudaKnobs",
    "LlvmKnobs",
    "TunedKernel",
    "TuningDatabaseError",
    "branch_product_primfunc",
    "build_branch_product",
    "cuda_target",
    "default_llvm_knobs",
    "host_llvm_target",
    "llvm_knob_choices",
    "open_database",
    "pack_weights",
    "reference_numpy",
    "schedule_branch_product",
    "schedule_cuda",
    "schedule_llvm",
    "tune_branch_product",
]
