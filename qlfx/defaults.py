"""Defaults the command line needs before torch is imported, so that bad usage fails in milliseconds."""

# fold-bn first (the passes after it match conv / product / slice patterns a BN would hide), constant-fold
# before fuse-product (it stores computed weights), dce after the rewrites.
DEFAULT_PIPELINE = "fold-bn,merge-parallel,constant-fold,dce,fuse-product,expand-depthwise"
