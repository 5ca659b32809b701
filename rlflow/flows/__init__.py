"""The flow-matching core: time grids, the linear path, step kernels with exact log-probs, samplers.

Conventions: t = 0 is noise, t = 1 is data; ``x_t = (1 - t) x0 + t x1``; velocity target ``x1 - x0``;
log-probs are summed over event dimensions. See ``docs/flows.md``.
"""

from rlflow.flows.gaussian import (
    gaussian_entropy,
    gaussian_log_prob,
    standard_normal,
    standard_normal_log_prob,
)
from rlflow.flows.kernels import (
    CPSStep,
    EulerStep,
    FlowSDEStep,
    ReinFlowStep,
    StepKernel,
    StepOutput,
    make_kernel,
)
from rlflow.flows.paths import PathSample, flow_matching_loss, linear_path
from rlflow.flows.sampling import (
    ChainScores,
    Trajectory,
    VelocityModel,
    repeat_batch,
    sample_chain,
    score_chain,
)
from rlflow.flows.solvers import integrate_ode, nfe_per_step, sample_ode
from rlflow.flows.time import resolve_time_grid, sample_training_times, shift_times, time_grid

__all__ = [
    "CPSStep",
    "ChainScores",
    "EulerStep",
    "FlowSDEStep",
    "PathSample",
    "ReinFlowStep",
    "StepKernel",
    "StepOutput",
    "Trajectory",
    "VelocityModel",
    "flow_matching_loss",
    "gaussian_entropy",
    "gaussian_log_prob",
    "integrate_ode",
    "linear_path",
    "make_kernel",
    "nfe_per_step",
    "repeat_batch",
    "sample_chain",
    "sample_ode",
    "sample_training_times",
    "score_chain",
    "shift_times",
    "standard_normal",
    "standard_normal_log_prob",
    "time_grid",
    "resolve_time_grid",
]
