"""qlfx's passes, one per module. Importing this package registers them all."""
from . import (  # noqa: F401
    basis_change,
    constant_fold,
    dce,
    equalize,
    expand_depthwise,
    factor,
    fold_bn,
    fuse_product,
    merge_parallel,
    merge_pointwise,
    quantize,
    rebalance,
    rotate,
    slice,
    sparsify,
)
