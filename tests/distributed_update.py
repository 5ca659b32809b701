"""One GRPO update on a fixed batch, in whatever launch mode this script runs (one process, DDP, ZeRO-2/3).

Every process samples the same full batch (the same generator seed on all ranks, so ZeRO-3's collective
forwards stay in lockstep), keeps its share of the groups, and takes one optimizer update. The main process
writes ``result.json``: the mean loss over ranks (equal shares: the full batch's mean loss), the global
gradient norm, and the updated trainable weights (gathered) as safetensors. The tests compare a
two-process DeepSpeed run with a single-process run on the same data.

    python tests/distributed_update.py OUT PIPELINE PROMPTS
    DS_ACCELERATOR=cpu accelerate launch --config_file recipes/accelerate/zero2.yaml \\
        tests/distributed_update.py OUT PIPELINE PROMPTS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(out: str, pipeline: str, prompts: str) -> None:
    from rlflow.trainers.grpo import GRPOConfig, GRPOTrainer
    from rlflow.trainers.text_to_image import ModelConfig
    from rlflow.utils.checkpoint import save_state_dict

    config = GRPOConfig(
        output_dir=out,
        model=ModelConfig(path=pipeline, lora_r=4, lora_alpha=4.0),
        prompts=prompts,
        allow_eval_overlap=True,  # a four-line prompt file: evaluation is not what this script checks
        rewards={"brightness": 1.0},
        prompts_per_iteration=4,  # the full batch: 4 groups, split across ranks
        group_size=2,
        num_steps=4,
        timestep_fraction=1.0,
        kl_beta=0.04,
        learning_rate=1e-3,
        minibatch_size=8,
        num_epochs=2,  # the second update sees ratios != 1: a non-trivial loss
        report_to="none",
        asynchronous_rewards=False,
    )
    trainer = GRPOTrainer(config)
    runtime = trainer.runtime
    trainer.generator = torch.Generator().manual_seed(1234)  # identical on every rank
    full = trainer.collect()
    groups = torch.arange(len(full)).reshape(config.prompts_per_iteration, config.group_size)
    mine = groups.chunk(runtime.world_size)[runtime.rank].reshape(-1)
    metrics = trainer.update(full.select(mine))
    loss = torch.tensor([metrics["train/loss"], metrics["train/policy_loss"], metrics["train/kl"]])
    loss = runtime.accelerator.reduce(loss.to(runtime.device), reduction="mean").cpu()
    weights = trainer._trainable_state()  # gathered under ZeRO-3 (collective)
    if runtime.is_main:
        save_state_dict(weights, Path(out) / "weights.safetensors")
        result = {
            "mode": runtime.mode,
            "processes": runtime.world_size,
            "loss": float(loss[0]),
            "policy_loss": float(loss[1]),
            "kl": float(loss[2]),
            "grad_norm": metrics["train/grad_norm"],
        }
        (Path(out) / "result.json").write_text(json.dumps(result))
    runtime.finish()


if __name__ == "__main__":
    main(*sys.argv[1:4])
