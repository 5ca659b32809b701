"""Policies and velocity models: the MLP FlowPolicy over action chunks and its ReinFlow noise network."""

from rlflow.policies.flow_policy import FlowPolicy, FlowPolicyConfig
from rlflow.policies.noise import BoundedNoiseStd

__all__ = ["BoundedNoiseStd", "FlowPolicy", "FlowPolicyConfig"]
