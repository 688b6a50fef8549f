"""Where batch-1 time goes on the demo task: the prefill of the synthetic_gsm_easy prompt (its shots)
against one decode pass, and a pass's cost by width (median of 8, bf16, this machine).

    python benchmarks/demo_pass_cost.py mtp-demo/distilled
"""
import sys, time, statistics, torch, yaml
from pathlib import Path
from mtp_plugins.checkpoint import load_checkpoint
from mtp_plugins import synthetic
from transformers import DynamicCache
p = sys.argv[1]
SHOTS = yaml.safe_load((Path(__file__).parents[1] / "tasks" / "synthetic_gsm_easy.yaml").read_text())["num_fewshot"]
model, tok, spec = load_checkpoint(p, dtype=torch.bfloat16)
model.eval()
shots = "".join(r["prompt"] + r["completion"] + "\n\n" for r in synthetic.problems("train", SHOTS, difficulty="easy"))
row = synthetic.problems("test", 1, difficulty="easy")[0]
ids = tok(shots + row["prompt"], return_tensors="pt").input_ids
T = ids.shape[1]
def prefill():
    c = DynamicCache(); t = time.perf_counter()
    with torch.no_grad(): model(input_ids=ids, past_key_values=c, position_ids=torch.arange(T)[None], use_cache=True)
    return time.perf_counter() - t, c
def step(c, w):
    x = ids[:, -w:]
    t = time.perf_counter()
    with torch.no_grad(): model(input_ids=x, past_key_values=c, position_ids=torch.arange(T, T + w)[None], use_cache=True)
    dt = time.perf_counter() - t; c.crop(-w); return dt
res = {"prefill": [], 1: [], 3: [], 5: [], 7: []}
for _ in range(8):
    dt, c = prefill(); res["prefill"].append(dt)
    for w in (1, 3, 5, 7): res[w].append(step(c, w))
m = {k: statistics.median(v) * 1000 for k, v in res.items()}
print(f"prompt {T} tokens; prefill {m['prefill']:.1f} ms = {m['prefill'] / m[1]:.1f} one-token passes; " +
      ", ".join(f"width {w}: {m[w]:.1f} ms ({m[w] / m[1]:.2f}x)" for w in (1, 3, 5, 7)))
