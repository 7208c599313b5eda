"""qlfx's passes, one per module. Importing this package registers them all."""
from . import constant_fold, dce, fold_bn, merge_parallel  # noqa: F401
