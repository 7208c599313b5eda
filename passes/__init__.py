"""qlfx's passes, one per module. Importing this package registers them all."""
from . import (  # noqa: F401
    basis_change,
    constant_fold,
    dce,
    expand_depthwise,
    fold_bn,
    fuse_product,
    merge_parallel,
    rebalance,
    slice,
    sparsify,
)
