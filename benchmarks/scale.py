"""Scale benchmark: per-rank parameter and optimizer memory, and step time, under DDP, ZeRO-2 and ZeRO-3.

The driver launches, for each mode, a 2-process run of this same file (``--worker``) with the shipped
accelerate launch config of that mode (recipes/accelerate/multi_gpu.yaml, zero2.yaml, zero3.yaml), on CPU
processes (gloo): ``ACCELERATE_USE_CPU=true`` for DDP, ``DS_ACCELERATOR=cpu`` for DeepSpeed, and
``OMP_NUM_THREADS=1`` per process. Each worker builds an SD3-architecture transformer (diffusers
``SD3Transformer2DModel``, ~166M parameters by default), fully fine-tunes it (every parameter trainable,
torch AdamW) through :class:`rlflow.utils.distributed.DistributedRuntime`, and runs a few steps of a
synthetic flow-matching MSE loss on random latents and prompt embeddings. The batch and the resolution are
small on purpose: the step is then dominated by the optimizer and the communication, which is what the
sharding changes.

After the steps every rank counts the bytes it holds (each tensor storage once):

- parameters: the model's weights on this rank -- whole under DDP and ZeRO-2 (ZeRO-2 keeps them in one
  flat buffer); under ZeRO-3 the rank's flat shard (``param.ds_tensor``) plus the small parameters that
  DeepSpeed keeps gathered on every rank (below ``stage3_param_persistence_threshold``).
- optimizer: DDP: every tensor in AdamW's ``state``. DeepSpeed: the ZeRO optimizer's fp32 master partition
  (ZeRO-2: ``single_partition_of_fp32_groups``, ZeRO-3: ``fp32_partitioned_groups_flat``) plus the inner
  AdamW's state of that partition. Storage already counted as parameters would not be counted again
  (``optimizer_master_shared_with_parameters``); DeepSpeed 0.19 clones the master partition even in fp32.
- gradients (reported separately, not in ``total``): DDP: ``param.grad`` (DDP's reducer buckets are a
  further copy not counted); ZeRO-2: the partitioned gradient buffer ``grads_in_partition`` plus the
  reduce bucket ``ipg_buffer`` (both freed after each step, so this reads 0 between steps); ZeRO-3: its
  persistent ``grad_partitions_flat_buffer``.
- peak RSS (``getrusage``), a rough cross-check that includes activations, buffers and the interpreter.

Everything runs in float32 (the configs' ``mixed_precision: 'no'``; CPU), so the expected bytes per
parameter are DDP 4 weights + 8 Adam; ZeRO-2 4 weights + (4 master + 8 Adam) / N; ZeRO-3
(4 + 4 + 8) / N, plus the persistent small parameters whole.

Run:  .venv/bin/python benchmarks/scale.py        (~4-7 min on 2 CPU cores)
      -> benchmarks/results/scale.json   (summarised in docs/scale.md and docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_DIR = ROOT / "recipes" / "accelerate"

#: mode -> (launch config, extra environment, extra accelerate launch flags)
MODES: dict[str, tuple[str, dict[str, str], list[str]]] = {
    "ddp": ("multi_gpu.yaml", {"ACCELERATE_USE_CPU": "true"}, []),
    "zero2": ("zero2.yaml", {"DS_ACCELERATOR": "cpu"}, []),
    "zero3": ("zero3.yaml", {"DS_ACCELERATOR": "cpu"}, []),
}
PROCESSES = 2

# Latent and text shapes: SD3's 16 latent channels, small 16x16 latents (64 image tokens after 2x2
# patches), 16 text tokens. Small on purpose, so that activations stay a minor cost next to the weights.
LATENT_CHANNELS = 16
JOINT_DIM = 1024
POOLED_DIM = 512


# ----------------------------------------------------------------------------------------------- worker
def build_model(layers: int, heads: int, head_dim: int, sample_size: int) -> nn.Module:
    """An ``SD3Transformer2DModel`` (SD3's layout: joint attention blocks, AdaLN) scaled by ``layers`` and
    ``heads x head_dim``; seeded so that every rank starts from the same weights (as DDP requires)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=JOINT_DIM,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=POOLED_DIM,
        out_channels=LATENT_CHANNELS,
        pos_embed_max_size=sample_size // 2,
    )


def unique_bytes(tensors: Iterable[Any], seen: set[int]) -> int:
    """Bytes of the storages behind ``tensors`` not already in ``seen`` (their addresses), adding them.

    Counting storages rather than tensors counts a flat buffer once however many parameter views it backs
    (ZeRO-2's flattened weights, ZeRO-3's shards), and never counts one buffer under two headings."""
    total = 0
    for tensor in tensors:
        if not isinstance(tensor, Tensor) or tensor.numel() == 0:
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [
        value for state in optimizer.state.values() for value in state.values() if isinstance(value, Tensor)
    ]


def measure_memory(runtime: Any, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> dict:
    """This rank's parameter, optimizer and gradient bytes (see the module docstring for what counts)."""
    seen: set[int] = set()
    persistent = 0
    if runtime.zero_stage == 3:
        shards = unique_bytes((p.ds_tensor for p in params), seen)
        # Small parameters stay gathered on every rank (stage3_param_persistence_threshold): p.data whole.
        persistent = unique_bytes((p.data for p in params), seen)
        parameters = shards + persistent
    else:
        parameters = unique_bytes((p.data for p in params), seen)

    shared_with_parameters = 0
    if runtime.engine is None:
        optimizer_bytes = unique_bytes(optimizer_state_tensors(optimizer), seen)
        gradients = unique_bytes((p.grad for p in params), seen)
    else:
        zero = runtime.engine.optimizer
        if runtime.zero_stage == 3:
            masters = list(zero.fp32_partitioned_groups_flat)
            grad_buffers = [zero.grad_partitions_flat_buffer]
        else:
            masters = list(zero.single_partition_of_fp32_groups)
            grad_buffers = [
                getattr(zero, "grads_in_partition", None),
                *(getattr(zero, "ipg_buffer", None) or []),
            ]
        shared_with_parameters = sum(
            m.untyped_storage().nbytes() for m in masters if m.untyped_storage().data_ptr() in seen
        )
        optimizer_bytes = unique_bytes(masters, seen) + unique_bytes(
            optimizer_state_tensors(zero.optimizer), seen
        )
        gradients = unique_bytes(grad_buffers, seen)
    return {
        "parameters": parameters,
        "parameters_persistent_full": persistent,
        "optimizer": optimizer_bytes,
        "optimizer_master_shared_with_parameters": shared_with_parameters,
        "gradients": gradients,
        "total": parameters + optimizer_bytes,
    }


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from rlflow.utils.distributed import DistributedRuntime, MemoryConfig

    runtime = DistributedRuntime(
        device="cpu", memory=MemoryConfig(), max_grad_norm=1.0, micro_batch_size=args.batch_size
    )
    model = build_model(args.layers, args.heads, args.head_dim, args.sample_size)
    params = [p for p in model.parameters() if p.requires_grad]
    num_params = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    wrapped, prepared = runtime.prepare(model, optimizer)
    wrapped.train()

    # Each rank its own data (as the trainers' ranks sample their own prompt groups).
    generator = torch.Generator().manual_seed(1000 + runtime.rank)
    b, s = args.batch_size, args.sample_size
    step_seconds: list[float] = []
    forward_seconds: list[float] = []
    grad_norms: list[float] = []
    for step in range(args.warmup + args.steps):
        runtime.zero_grad(prepared)
        x0 = torch.randn(b, LATENT_CHANNELS, s, s, generator=generator)
        noise = torch.randn(b, LATENT_CHANNELS, s, s, generator=generator)
        text = torch.randn(b, args.text_tokens, JOINT_DIM, generator=generator)
        pooled = torch.randn(b, POOLED_DIM, generator=generator)
        t = torch.rand(b, generator=generator)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        runtime.wait()  # start together: the time is then the slowest rank's step
        start = time.perf_counter()
        velocity = wrapped(
            hidden_states=xt,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=t * 1000,
            return_dict=False,
        )[0]
        loss = F.mse_loss(velocity.float(), noise - x0)
        forward_end = time.perf_counter()
        runtime.backward(loss, boundary=True)
        grad_norms.append(runtime.step(prepared, params))
        runtime.wait()
        if step >= args.warmup:
            step_seconds.append(time.perf_counter() - start)
            forward_seconds.append(forward_end - start)

    # Under DDP the gradients are still there (zero_grad runs at the start of a step); DeepSpeed keeps
    # its gradient partition buffers between steps.
    row = {
        "rank": runtime.rank,
        "mode": runtime.mode,
        "bytes": measure_memory(runtime, params, optimizer),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_bytes": current_rss(),
        "step_seconds": step_seconds,
        "forward_seconds": forward_seconds,
        "grad_norms": grad_norms,
        "torch_threads": torch.get_num_threads(),
    }
    rows: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(rows, row)
    if runtime.is_main:
        Path(args.out).write_text(
            json.dumps({"model_parameters": num_params, "world_size": runtime.world_size, "ranks": rows})
        )
    runtime.wait()


# ----------------------------------------------------------------------------------------------- driver
def expected_bytes(mode: str, num_params: int, world: int) -> dict[str, float]:
    """Float32 (what these CPU runs use): 4 bytes of weights, 8 of AdamW moments, 4 of DeepSpeed's fp32
    master copy of its partition (a clone even when the weights are fp32 already). ZeRO-3's persistent
    small parameters (kept whole on every rank) are not in the theory."""
    if mode == "ddp":
        parameters, optimizer, gradients = 4.0 * num_params, 8.0 * num_params, 4.0 * num_params
    elif mode == "zero2":
        parameters, optimizer, gradients = (
            4.0 * num_params,
            12.0 * num_params / world,
            4.0 * num_params / world,
        )
    else:
        parameters, optimizer, gradients = (
            4.0 * num_params / world,
            12.0 * num_params / world,
            4.0 * num_params / world,
        )
    return {
        "parameters": parameters,
        "optimizer": optimizer,
        "gradients": gradients,
        "total": parameters + optimizer,
    }


def launch(mode: str, args: argparse.Namespace, workdir: Path) -> tuple[dict, float, list[str]]:
    config, extra_env, flags = MODES[mode]
    out = workdir / f"{mode}.json"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    command = [
        accelerate, "launch", "--config_file", str(ACCELERATE_DIR / config), *flags,
        "--num_processes", str(PROCESSES), __file__, "--worker", "--out", str(out),
        "--layers", str(args.layers), "--heads", str(args.heads), "--head-dim", str(args.head_dim),
        "--sample-size", str(args.sample_size), "--text-tokens", str(args.text_tokens),
        "--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra_env}
    log = workdir / f"{mode}.log"
    start = time.perf_counter()
    with log.open("w") as f:
        result = subprocess.run(command, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=1800)
    wall = time.perf_counter() - start
    if result.returncode != 0 or not out.exists():
        sys.stderr.write(log.read_text()[-5000:])
        raise SystemExit(f"{mode}: the launch failed (exit {result.returncode}); log above")
    env_shown = " ".join(f"{k}={v}" for k, v in {"OMP_NUM_THREADS": "1", **extra_env}.items())
    # Shown relative to the repository, with the temporary output path elided.
    shown = [
        env_shown,
        *(c.replace(str(ROOT) + "/", "").replace(str(out), "<tmp>/" + out.name) for c in command),
    ]
    return json.loads(out.read_text()), wall, shown


def summarise(mode: str, raw: dict, wall: float, command: list[str]) -> dict:
    ranks = sorted(raw["ranks"], key=lambda r: r["rank"])
    keys = ranks[0]["bytes"].keys()
    per_rank = {key: [r["bytes"][key] for r in ranks] for key in keys}
    step_times = [max(ts) for ts in zip(*(r["step_seconds"] for r in ranks), strict=True)]
    expected = expected_bytes(mode, raw["model_parameters"], raw["world_size"])
    return {
        "launch_config": f"recipes/accelerate/{MODES[mode][0]}",
        "command": " ".join(command),
        "bytes_per_rank": {
            "max_over_ranks": {key: max(values) for key, values in per_rank.items()},
            "per_rank": per_rank,
            "expected": expected,
            "measured_over_expected": {
                key: max(per_rank[key]) / expected[key] for key in expected if expected[key] > 0
            },
        },
        "peak_rss_bytes_per_rank": [r["peak_rss_bytes"] for r in ranks],
        "rss_after_steps_bytes_per_rank": [r["rss_after_bytes"] for r in ranks],
        "step_seconds": step_times,
        "step_seconds_median": statistics.median(step_times),
        # Forward pass + loss (slowest rank); the rest of a step is backward, communication and the update.
        "forward_seconds_median": statistics.median(
            max(ts) for ts in zip(*(r["forward_seconds"] for r in ranks), strict=True)
        ),
        "grad_norms_rank0": ranks[0]["grad_norms"],
        "launch_wall_seconds": wall,
        "torch_threads": ranks[0]["torch_threads"],
    }


def driver(args: argparse.Namespace) -> None:
    import accelerate
    import deepspeed
    import diffusers

    modes = args.modes.split(",")
    results: dict[str, Any] = {}
    model_parameters = None
    total_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rlflow_scale_") as tmp:
        for mode in modes:
            print(f"[{mode}] launching {PROCESSES} processes ...", flush=True)
            raw, wall, command = launch(mode, args, Path(tmp))
            model_parameters = raw["model_parameters"]
            results[mode] = summarise(mode, raw, wall, command)
            print(f"[{mode}] done in {wall:.0f}s, median step {results[mode]['step_seconds_median']:.2f}s")
    if "ddp" in results:
        for summary in results.values():
            # Same initial weights and per-rank data in every mode: the pre-clip gradient norms must agree
            # (a check that the sharded runs train the same model, not only that they run).
            summary["grad_norms_max_abs_diff_vs_ddp"] = max(
                abs(a - b)
                for a, b in zip(summary["grad_norms_rank0"], results["ddp"]["grad_norms_rank0"], strict=True)
            )
            summary["step_time_ratio_vs_ddp"] = (
                summary["step_seconds_median"] / results["ddp"]["step_seconds_median"]
            )
            ddp_total = results["ddp"]["bytes_per_rank"]["max_over_ranks"]["total"]
            summary["total_bytes_ratio_vs_ddp"] = (
                summary["bytes_per_rank"]["max_over_ranks"]["total"] / ddp_total
            )

    report = {
        "benchmark": "per-rank parameter + optimizer memory and step time: DDP vs ZeRO-2 vs ZeRO-3",
        "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
        "wall_seconds": time.perf_counter() - total_start,
        "model": {
            "class": "diffusers.SD3Transformer2DModel",
            "num_layers": args.layers,
            "num_attention_heads": args.heads,
            "attention_head_dim": args.head_dim,
            "latent": [LATENT_CHANNELS, args.sample_size, args.sample_size],
            "text_tokens": args.text_tokens,
            "joint_attention_dim": JOINT_DIM,
        },
        "model_parameters": model_parameters,
        "trainable": "all parameters (full fine-tuning), torch AdamW, float32",
        "batch_size_per_rank": args.batch_size,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "processes": PROCESSES,
        "torch_threads": max(s["torch_threads"] for s in results.values()),  # per process, measured
        "device": "cpu (gloo)",
        "bytes_per_rank_note": (
            "max_over_ranks: the largest rank's bytes; per_rank: every rank's. total = parameters + optimizer "
            "(gradients reported apart). expected: float32 theory (DDP 4+8 B/param; ZeRO-2 4 + (4+8)/N; "
            "ZeRO-3 (4+4+8)/N: DeepSpeed's fp32 master partition is a copy). step_seconds: per timed step, the "
            "slowest rank's; the machine was shared with other work, so compare ratios, not seconds."
        ),
        "modes": results,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "accelerate": accelerate.__version__,
            "deepspeed": deepspeed.__version__,
            "diffusers": diffusers.__version__,
        },
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    mib = 2**20
    print(f"\nmodel: {model_parameters / 1e6:.1f}M parameters, {PROCESSES} processes, float32")
    print(f"{'mode':6} {'params MiB':>11} {'optim MiB':>10} {'total MiB':>10} {'expected':>9} "
          f"{'grads MiB':>10} {'peak RSS':>9} {'step s':>7} {'fwd s':>6} {'vs ddp':>7}")  # fmt: skip
    for mode, s in results.items():
        b = s["bytes_per_rank"]["max_over_ranks"]
        print(
            f"{mode:6} {b['parameters'] / mib:11.0f} {b['optimizer'] / mib:10.0f} {b['total'] / mib:10.0f} "
            f"{s['bytes_per_rank']['expected']['total'] / mib:9.0f} {b['gradients'] / mib:10.0f} "
            f"{max(s['peak_rss_bytes_per_rank']) / mib:9.0f} {s['step_seconds_median']:7.2f} {s['forward_seconds_median']:6.2f} "
            f"{s.get('step_time_ratio_vs_ddp', float('nan')):7.2f}"
        )
    print(f"-> {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help="internal: one process of a launched run")
    parser.add_argument("--out", help="internal: where the worker's rank 0 writes its JSON")
    parser.add_argument("--modes", default="ddp,zero2,zero3")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--sample-size", type=int, default=16, help="latent height and width")
    parser.add_argument("--text-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1, help="per process")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    args = parser.parse_args()
    if args.worker:
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
