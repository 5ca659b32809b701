"""Utilities shared by every trainer: checkpoints, seeding, EMA, LR schedules, run logging, plots, distances.

Submodules are deliberately *not* imported here so that ``import rlflow`` stays light (TensorBoard and
matplotlib are only imported when a run logger or a plot is actually used). Import what you need directly::

    from rlflow.utils.checkpoint import save_state_dict, load_state_dict, atomic_directory
    from rlflow.utils.seeding import seed_everything, capture_rng_state, restore_rng_state
    from rlflow.utils.ema import EMA
    from rlflow.utils.schedules import make_lr_scheduler
    from rlflow.utils.run import RunLogger, read_metrics
    from rlflow.utils.plotting import plot_metric_curves, scatter_2d
    from rlflow.utils.distances import sliced_wasserstein, mmd_rbf
"""
