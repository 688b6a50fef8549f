"""Where batch-1 time goes on the demo task: the prefill of the synthetic_gsm_easy prompt (its shots)
against one decode pass, and a pass's cost by width (median of 8, bf16, this machine).

    python benchmarks/demo_pass_cost.py mtp-demo/distilled
"""
import sys, time, statistics, torch
from common import demo_prompts
from mtp_plugins.checkpoint import load_checkpoint
from transformers import DynamicCache
p = sys.argv[1]
model, tok, spec = load_checkpoint(p, dtype=torch.bfloat16)
model.eval()
ids = tok(demo_prompts(1)[0], return_tensors="pt").input_ids
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
