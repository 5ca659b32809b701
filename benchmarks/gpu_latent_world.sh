#!/usr/bin/env bash
# The latent shapes world on one CUDA GPU: the VAE (recipes/alignment/shapes_vae.yaml), then two base MM-DiTs
# in parallel (recipes/alignment/shapes_latent_pretrain.yaml at patch 2 and at patch 1), each saving every
# evaluated model; picks for each the evaluated step whose held-out verifier accuracy is nearest 0.35 inside
# [0.2, 0.5] and packs VAE, picked bases and logs into $OUT (default runs/gpu_latent).
#   bash benchmarks/gpu_latent_world.sh
# Needs torch with CUDA and rlflow's [diffusers] extra (or their wheels in .whl/, installed into /tmp/site on
# a machine without an index).
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_latent}; mkdir -p "$OUT"
W=${W:-runs/gpu_latent_work}; mkdir -p "$W"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
# rlflow without installing it: the package with envs/ and reward_models/ linked in where setuptools maps them.
rm -rf /tmp/shim && mkdir -p /tmp/shim && cp -r rlflow /tmp/shim/ && ln -s "$PWD/envs" /tmp/shim/rlflow/envs \
  && ln -s "$PWD/reward_models" /tmp/shim/rlflow/reward_models
export PYTHONPATH=/tmp/shim:/tmp/site
R="python3 -m rlflow"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, torch.cuda.is_available())"
t0=$(date +%s)
$R pretrain-vae --config recipes/alignment/shapes_vae.yaml --device cuda --num_threads 4 --output_dir $W/vae \
  --report_to none ${VAE_ARGS:-} > $W/vae.log 2>&1 || { tail -30 $W/vae.log; exit 1; }
echo "vae done in $(( $(date +%s) - t0 )) s"; python3 -c "import json; s=json.load(open('$W/vae/summary.json')); print({k: s[k] for k in ('verifier_accuracy','psnr','mse','shift_factor','scaling_factor','wall_seconds')})"
for p in 2 1; do
  timeout ${BASE_TIMEOUT:-400} $R pretrain-t2i --config recipes/alignment/shapes_latent_pretrain.yaml --device cuda --num_threads 4 \
    --vae_path $W/vae/final --model.patch_size $p --output_dir $W/base_p$p --report_to none ${BASE_ARGS:-} > $W/base_p$p.log 2>&1 &
done
wait
echo "bases done in $(( $(date +%s) - t0 )) s"
python3 - "$W" "$OUT" <<'PY'
import json, sys, tarfile
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
with tarfile.open(out / "vae.tar", "w") as tar:
    tar.add(work / "vae" / "final", arcname="shapes_vae")
for run in sorted(r for r in work.glob("base_p*") if r.is_dir()):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()] if (run / "metrics.jsonl").exists() else []
    evals = [(int(r["step"]), r["eval/accuracy"], r.get("eval/accuracy_stderr"), {k.split("/")[-1]: round(v, 3) for k, v in r.items() if k.startswith("eval/accuracy/")}) for r in rows if "eval/accuracy" in r]
    for e in evals: print(run.name, "step", e[0], "acc %.3f +- %.3f" % (e[1], e[2] or 0), e[3])
    saved = [e for e in evals if (run / "models" / f"step_{e[0]:08d}").is_dir()]
    if not saved:
        print(run.name, "no evaluated model saved"); continue
    # Inside [0.2, 0.5] first, then nearest 0.35.
    pick = min(saved, key=lambda e: (not 0.2 <= e[1] <= 0.5, abs(e[1] - 0.35)))
    print(run.name, "picked step", pick[0], "acc", round(pick[1], 3), "in range" if 0.2 <= pick[1] <= 0.5 else "OUT OF RANGE")
    with tarfile.open(out / f"{run.name}_pick.tar", "w") as tar:  # one model per file: each under 16 MiB
        tar.add(run / "models" / f"step_{pick[0]:08d}", arcname=f"{run.name}_step{pick[0]}")
    if (run / "final").is_dir() and pick[0] != max(e[0] for e in evals):
        with tarfile.open(out / f"{run.name}_final.tar", "w") as tar:
            tar.add(run / "final", arcname=f"{run.name}_final")
with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
    for run in sorted(work.iterdir()):
        if run.is_dir():
            for name in ("metrics.jsonl", "summary.json", "config.yaml"):
                if (run / name).exists(): tar.add(run / name, arcname=f"{run.name}/{name}")
            for png in sorted((run / "plots").glob("*.png")): tar.add(png, arcname=f"{run.name}/plots/{png.name}")
        elif run.suffix == ".log": tar.add(run, arcname=run.name)
PY
ls -la "$OUT"
