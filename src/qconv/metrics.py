"""Accuracy metrics."""

from .contract import fp32_error_bound, nrmse

__all__ = ["nrmse", "fp32_error_bound"]
