#!/usr/bin/env bash
# DeepSpeed checks on one CUDA GPU (docs/scale.md, "Checked on one GPU"): GRPO updates under plain / ZeRO-2 /
# ZeRO-3 engines on a fixed batch, bf16 GRPO runs with resume, the shapes world, and every other generative
# trainer under ZeRO bf16. Needs rlflow's [diffusers,deepspeed] extras (or their wheels in .whl/, installed
# into /tmp/site on a machine without an index). Logs go to $OUT (default: runs/gpu_check).
#   bash benchmarks/gpu_zero_check.sh
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_check}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
L="python3 -m accelerate.commands.launch"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, deepspeed, diffusers, accelerate, peft, transformers; print('versions', torch.__version__, deepspeed.__version__, diffusers.__version__, accelerate.__version__, peft.__version__, transformers.__version__, torch.cuda.get_device_name())" 2>&1 | grep -v Warn | tail -2
python3 -c "from rlflow.testing import build_tiny_sd3_pipeline; build_tiny_sd3_pipeline('/tmp/pipe')" >/dev/null 2>&1
printf "a red square\na blue circle\ntwo green triangles\na yellow star\n" > /tmp/prompts.txt
step() { local name=$1; shift; local t0=$(date +%s.%N); "$@" > $OUT/$name.log 2>&1; local rc=$?; echo "== $name rc=$rc wall=$(python3 -c "print(round($(date +%s.%N)-$t0,1))")s"; [ $rc = 0 ] || tail -25 $OUT/$name.log; }
# 1. One fixed-batch GRPO update: plain CUDA vs ZeRO-2 / ZeRO-3 engines (one process each).
step u_single python3 tests/distributed_update.py /tmp/u_single /tmp/pipe /tmp/prompts.txt
step u_zero2 $L --config_file recipes/accelerate/zero2.yaml --num_processes 1 tests/distributed_update.py /tmp/u_zero2 /tmp/pipe /tmp/prompts.txt
step u_zero3 $L --config_file recipes/accelerate/zero3.yaml --num_processes 1 tests/distributed_update.py /tmp/u_zero3 /tmp/pipe /tmp/prompts.txt
for m in single zero2 zero3; do echo "$m $(cat /tmp/u_$m/result.json)"; done
python3 - <<'PY'
from safetensors.torch import load_file
a = load_file("/tmp/u_single/weights.safetensors")
for m in ("zero2", "zero3"):
    try:
        b = load_file(f"/tmp/u_{m}/weights.safetensors")
        print(m, "max |w - w_single| =", max((a[k].float() - b[k].float()).abs().max().item() for k in a))
    except Exception as e:
        print(m, "FAILED", e)
PY
# 2. rlflow grpo under ZeRO-2 with bf16 on the tiny pipeline (3 iterations, checkpoint, resume to 4).
G=(-m rlflow grpo --model.path /tmp/pipe --prompts /tmp/prompts.txt --rewards "{brightness: 1.0}" --prompts_per_iteration 2 --group_size 4 --num_steps 6 --eval_num_steps 6 --num_eval_prompts 4 --model.lora_r 4 --learning_rate 1e-3 --save_steps 1 --report_to none --ema_decay 0.9)
step grpo_z2_bf16 $L --config_file recipes/accelerate/zero2.yaml --num_processes 1 --mixed_precision bf16 "${G[@]}" --iterations 3 --output_dir /tmp/g
step grpo_z2_bf16_resume $L --config_file recipes/accelerate/zero2.yaml --num_processes 1 --mixed_precision bf16 "${G[@]}" --iterations 4 --output_dir /tmp/g
step grpo_z3_bf16 $L --config_file recipes/accelerate/zero3.yaml --num_processes 1 --mixed_precision bf16 "${G[@]}" --iterations 3 --output_dir /tmp/g3
python3 - <<'PY'
import json
for d in ("/tmp/g", "/tmp/g3"):
    try:
        for line in open(f"{d}/metrics.jsonl"):
            r = json.loads(line)
            print(d, {k: r[k] for k in ("step", "train/loss", "train/kl", "train/grad_norm", "train/first_log_ratio_per_element", "eval/reward_mean", "time/iteration_seconds") if k in r})
        s = json.load(open(f"{d}/summary.json")); print(d, "summary distributed", s.get("distributed"), "checksums", s.get("process_param_checksums"))
    except Exception as e:
        print(d, "FAILED", e)
PY
# 3. The shapes world and the other trainers under ZeRO bf16.
python3 -c "
from rlflow.data.preferences import save_preferences
from tests.test_reward_model import _image_set
save_preferences(_image_set(256, seed=0), '/tmp/prefs')" > /dev/null 2>&1
S=(-m rlflow grpo --config recipes/alignment/shapes_grpo.yaml --iterations 6 --eval_steps 6 --save_steps 6 --report_to none)
step shapes_plain python3 "${S[@]}" --output_dir /tmp/s_plain
step shapes_z2_bf16 $L --num_processes 1 --mixed_precision bf16 --config_file recipes/accelerate/zero2.yaml "${S[@]}" --output_dir /tmp/s_z2
step shapes_z3_bf16 $L --num_processes 1 --mixed_precision bf16 --config_file recipes/accelerate/zero3.yaml "${S[@]}" --output_dir /tmp/s_z3
O=(--model.path /tmp/pipe --prompts /tmp/prompts.txt --rewards "{brightness: 1.0}" --iterations 3 --prompts_per_iteration 2 --samples_per_prompt 4 --num_steps 6 --eval_num_steps 6 --num_eval_prompts 4 --minibatch_size 8 --model.lora_r 4 --model.lora_alpha 4 --report_to none)
step dpo_z2 $L --num_processes 1 --mixed_precision bf16 --config_file recipes/accelerate/zero2.yaml -m rlflow dpo --mode online "${O[@]}" --output_dir /tmp/dpo
step rwr_z2 $L --num_processes 1 --mixed_precision bf16 --config_file recipes/accelerate/zero2.yaml -m rlflow rwr "${O[@]}" --output_dir /tmp/rwr
step ac_z3 $L --num_processes 1 --mixed_precision bf16 --config_file recipes/accelerate/zero3.yaml -m rlflow actor-critic "${O[@]}" --critic_warmup_iterations 1 --output_dir /tmp/ac
step rm_z2 $L --num_processes 1 --mixed_precision bf16 --config_file recipes/accelerate/zero2.yaml -m rlflow reward-model --data_dir /tmp/prefs --device auto --steps 40 --batch_size 32 --warmup_steps 2 --eval_steps 20 --save_steps 20 --report_to none --plot_curves false --output_dir /tmp/rm
python3 - <<'PY'
import json
for d in ("/tmp/s_plain", "/tmp/s_z2", "/tmp/s_z3", "/tmp/dpo", "/tmp/rwr", "/tmp/ac", "/tmp/rm"):
    try:
        rows = [json.loads(l) for l in open(f"{d}/metrics.jsonl")]
        it = [round(r["time/iteration_seconds"], 2) for r in rows if "time/iteration_seconds" in r]
        fr = [r.get("train/first_log_ratio_per_element") for r in rows if "train/first_log_ratio_per_element" in r]
        s = json.load(open(f"{d}/summary.json"))
        keys = [k for k in ("final_accuracy", "base_accuracy", "final_reward_mean", "base_reward_mean", "accuracy", "loss") if k in s]
        print(d, "iter_s", it, "first_ratio", fr, {k: s[k] for k in keys}, s.get("distributed"), "nan_in_metrics", any(v != v for r in rows for v in r.values() if isinstance(v, float)))
    except Exception as e:
        print(d, "FAILED", repr(e))
PY
nvidia-smi --query-gpu=name --format=csv,noheader
# 4. fp16: DeepSpeed's loss scaling (ZeRO-2) vs torch's GradScaler (plain accelerate), 4 GRPO iterations.
F=(-m rlflow grpo --model.path /tmp/pipe --prompts /tmp/prompts.txt --rewards "{brightness: 1.0}" --prompts_per_iteration 2 --group_size 4 --num_steps 6 --eval_num_steps 6 --num_eval_prompts 4 --model.lora_r 4 --learning_rate 1e-3 --report_to none --iterations 4)
step fp16_z2 $L --num_processes 1 --mixed_precision fp16 --config_file recipes/accelerate/zero2.yaml "${F[@]}" --output_dir /tmp/f1
step fp16_plain python3 "${F[@]}" --memory.mixed_precision fp16 --output_dir /tmp/f2
python3 - <<'PY'
import json
for d in ("/tmp/f1", "/tmp/f2"):
    try:
        for line in open(f"{d}/metrics.jsonl"):
            r = json.loads(line)
            print(d, {k: r[k] for k in ("step", "train/loss", "train/kl", "train/grad_norm", "train/first_log_ratio_per_element") if k in r})
    except Exception as e:
        print(d, "FAILED", repr(e))
PY
