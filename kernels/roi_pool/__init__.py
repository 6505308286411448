"""Fused region pooling: 1x1 RoIAlign of boxes on a [B, H*W, C] token map, Triton or torch."""
from kernels.roi_pool.api import BACKENDS, RegionPool, region_pool
from kernels.roi_pool.reference import region_pool_torch

__all__ = ["BACKENDS", "RegionPool", "region_pool", "region_pool_torch"]
