"""Datasets: (condition, target) data for flow matching, and built-in toy distributions."""

from rlflow.data.datasets import FlowMatchingData, load_npz_data, toy_2d_data
from rlflow.data.toy2d import TOY_2D_NAMES, sample_toy_2d

__all__ = ["TOY_2D_NAMES", "FlowMatchingData", "load_npz_data", "sample_toy_2d", "toy_2d_data"]
