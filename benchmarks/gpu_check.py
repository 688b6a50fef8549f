"""GPU check of MTP decoding: per-pass cost and tokens/s of ``ar`` vs ``static`` k on a Llama-3.2-1B-shaped model.

Needs one CUDA GPU and no hub: the model is built in memory with random weights (bf16, ``sdpa``
attention) and one shared MTP mask token added (embeddings resized by one, ``config.mtp`` written).
Three parts, cheapest and most important first:

1. exactness on the device: a small random Llama (float32) where engine ``ar`` and ``verify`` k=4
   equal HF ``model.generate(do_sample=False)`` token for token on a left-padded batch, and
   ``static`` k=1 equals ``ar``; one PASS/FAIL line per check;
2. per-pass cost: at the KV cache of a fixed-length prompt, the median time of one decoding pass
   feeding 1 token + (k-1) mask slots, k in {1, 2, 4, 8, 16}, mask entries cropped from the cache
   afterwards (as the engine does), at batch 1, 8 and 32;
3. tokens/s of ``mtp_plugins.generate`` with ``ar`` and ``static`` k in {2, 4, 8, 16} at a fixed
   length (no EOS), same batches (prefill of the prompt included, as a caller sees it);
4. the compiled path (``compile=True``: static KV cache, ``torch.compile`` with CUDA graphs) for
   ``ar`` and ``static`` k=8 at the batches of ``--compile-batches``: the first call's seconds (it
   compiles), then tokens/s and milliseconds per model call against the eager engine; plus, in part
   1, ``verify`` k=4 compiled == HF ``generate``.

It prints two markdown tables (batch | k | ms/pass | pass cost vs ar | tokens/s | tokens/s vs ar; and
the compiled path's), the exactness lines, the peak GPU memory per batch size and the target: a ``static`` k=8 pass costs
<= 1.2x an ``ar`` pass at batch 1 (decoding one row is memory-bound, so extra query tokens should be
nearly free). Sized to finish in about 2-3 minutes on one H200 (well under 8)::

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.md

``--tiny --device cpu`` runs the same code on a tiny model in seconds: it checks the script, not the GPU.
The exit status is 1 when an exactness check fails (after the report is written).
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # before the heavy imports: "Elapsed" counts them too

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from common import LLAMA_3_2_1B, TINY  # noqa: E402

import mtp_plugins  # noqa: E402
from mtp_plugins.checkpoint import MTPSpec, read_mtp_spec, write_mtp_spec  # noqa: E402

# The engine runs its passes under grouped_attention (a faster sdpa for grouped-query models): so do we.
from mtp_plugins.decoding.attention import grouped_attention  # noqa: E402
from mtp_plugins.decoding.kvcache import new_dynamic_cache  # noqa: E402
from mtp_plugins.files import write_atomic  # noqa: E402

# The exactness model: small, grouped-query (so the engine's grouped attention is exercised), float32.
EXACT = dict(LLAMA_3_2_1B, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=512, tie_word_embeddings=False)
EXACT_TINY = dict(EXACT, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512)

KS = (1, 2, 4, 8, 16)  # k=1 is the ar pass (no mask slot)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
HEADER = "| batch | k | ms/pass | pass cost vs ar | tokens/s | tokens/s vs ar |"
TARGET = 1.2


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_llama(shape: dict, device: torch.device, dtype: torch.dtype, seed: int, init_std: float | None = None):
    """A random Llama of ``shape`` in eval mode on ``device``; ``init_std`` rescales the matrices."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with device:
        model = LlamaForCausalLM(config)
    model.to(dtype).eval()
    if model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")
    if init_std is not None:
        # Std 0.02 gives nearly flat next-token distributions; a larger scale makes greedy choices
        # decisive (as in a trained model), so that float rounding cannot decide an exactness check.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, init_std)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@torch.no_grad()
def add_mask_token(model) -> MTPSpec:
    """One shared MTP mask token, as ``mtp_plugins.add_mask_tokens`` makes it, without a tokenizer:
    the embeddings grow by one row (the mean of the others) and ``config.mtp`` records its id."""
    vocab = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(vocab + 1, mean_resizing=False)
    for module in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
        module.weight[vocab] = module.weight[:vocab].float().mean(dim=0).to(module.weight.dtype)
    write_mtp_spec(model, MTPSpec(mask_token_ids=(vocab,)))
    return read_mtp_spec(model)


def random_prompts(batch: int, length: int, vocab: int, device: torch.device, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=generator).to(device)


# --- 1. exactness -------------------------------------------------------------------------------


def exactness(device: torch.device, tiny: bool) -> tuple[list[tuple[str, bool, str]], str]:
    model = build_llama(EXACT_TINY if tiny else EXACT, device, torch.float32, seed=11, init_std=0.2)
    add_mask_token(model)
    vocab = model.config.vocab_size - 1  # real tokens only in prompts
    lengths = [5, 17, 9, 30] if not tiny else [3, 9, 5, 12]
    width, max_new = max(lengths), 32 if not tiny else 12
    ids = random_prompts(len(lengths), width, vocab, device, seed=5)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):  # left padding
        ids[row, : width - n] = 0
        mask[row, width - n :] = 1
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
    hf = out.sequences
    # How close HF's greedy choices came to a tie: float rounding of a different kernel can only flip
    # a choice whose top-1 / top-2 logit margin is about as small as that rounding.
    top2 = torch.stack(out.scores, dim=1).float().topk(2, dim=-1).values
    margin = float((top2[..., 0] - top2[..., 1]).min())

    def engine(strategy: str, k: int):
        return mtp_plugins.generate(model, ids, mask, strategy=strategy, k=k, max_new_tokens=max_new,
                                    eos_token_id=[], pad_token_id=0).sequences

    ar = engine("ar", 1)
    compiled = mtp_plugins.generate(model, ids, mask, strategy="verify", k=4, max_new_tokens=max_new,
                                    eos_token_id=[], pad_token_id=0, compile=True).sequences
    checks = []
    for name, got, want in [
        ("engine ar == HF generate(do_sample=False)", ar, hf),
        ("engine verify k=4 == HF generate(do_sample=False)", engine("verify", 4), hf),
        ("engine static k=1 == engine ar", engine("static", 1), ar),
        ("engine verify k=4 compile=True == HF generate(do_sample=False)", compiled, hf),
    ]:
        same = got.shape == want.shape and torch.equal(got, want)
        rows = sum(torch.equal(a, b) for a, b in zip(got, want)) if got.shape == want.shape else 0
        checks.append((name, same, f"{rows}/{len(lengths)} rows equal"))
    c = model.config
    setup = (f"random Llama ({c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads}/"
             f"{c.num_key_value_heads} heads, vocab {c.vocab_size - 1} + 1 mask token), float32 on {device.type}; "
             f"{len(lengths)} left-padded rows (prompt lengths {lengths}), {max_new} new tokens, no EOS; "
             f"smallest top-1/top-2 logit margin of HF's greedy choices: {margin:.4f}")
    return [(f"{name} ({detail})", ok, detail) for name, ok, detail in checks], setup


# --- 2. per-pass cost ---------------------------------------------------------------------------


def pass_costs(model, prompt: torch.Tensor, ks, passes: int, warmup: int) -> dict[int, float]:
    """Median seconds of one decoding pass feeding 1 token + (k-1) mask slots at the prompt's cache,
    mask entries cropped afterwards, for each k; the k are interleaved so drift hits all alike."""
    spec = read_mtp_spec(model)
    device = prompt.device
    batch, length = prompt.shape
    state, blocks = {}, {}
    with torch.inference_mode(), grouped_attention(model):
        for k in ks:
            cache = new_dynamic_cache(model)
            model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
            valid = torch.ones(batch, length, dtype=torch.bool, device=device)
            state[k] = (cache, valid, length)
            blocks[k] = torch.tensor([[int(prompt[0, -1])] + spec.mask_ids(k - 1)] * batch, device=device)
        times: dict[int, list[float]] = {k: [] for k in ks}
        for i in range(warmup + passes):
            for k in ks:
                cache, valid, position = state[k]
                sync(device)
                start = time.perf_counter()
                attention = torch.cat([valid, torch.ones(batch, k, dtype=torch.bool, device=device)], dim=1)
                positions = (position + torch.arange(k, device=device)).repeat(batch, 1)
                logits = model(input_ids=blocks[k], attention_mask=attention, position_ids=positions,
                               cache=cache, use_cache=True, logits_to_keep=k).logits
                chosen = logits.argmax(dim=-1)
                if k > 1:
                    cache.crop(-(k - 1))
                chosen.tolist()  # the engine reads its choices on the host every pass
                sync(device)
                if i >= warmup:
                    times[k].append(time.perf_counter() - start)
                state[k] = (cache, attention[:, : attention.shape[1] - (k - 1)], position + 1)
        del state
    return {k: statistics.median(t) for k, t in times.items()}


# --- 3. tokens/s --------------------------------------------------------------------------------


def throughput(model, prompt: torch.Tensor, ks, max_new: int, repeats: int) -> dict[int, float]:
    """Median tokens/s of ``mtp_plugins.generate`` (``ar`` for k=1, ``static`` k otherwise) at a fixed
    length; one short warm-up call per strategy, then ``repeats`` interleaved timed calls."""
    device = prompt.device
    mask = torch.ones_like(prompt)

    def call(k: int, new: int):
        sync(device)
        start = time.perf_counter()
        out = mtp_plugins.generate(model, prompt, mask, strategy="ar" if k == 1 else "static", k=k,
                                   max_new_tokens=new, eos_token_id=[], pad_token_id=0)
        sync(device)
        seconds = time.perf_counter() - start
        if out.stats.tokens != prompt.shape[0] * new:
            raise RuntimeError(f"k={k}: {out.stats.tokens} tokens, expected {prompt.shape[0] * new}")
        return out.stats.tokens / seconds

    for k in ks:
        call(k, min(max_new, 2 * k))
    rates: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(repeats):
        for k in ks:
            rates[k].append(call(k, max_new))
    return {k: statistics.median(r) for k, r in rates.items()}


# --- 4. the compiled path ------------------------------------------------------------------------

COMPILED_KS = (1, 8)
COMPILED_HEADER = ("| batch | k | first call s (compiles) | tokens/s eager | tokens/s compiled | compiled vs eager "
                   "| ms/call compiled | call cost vs ar (compiled) |")


def compiled_throughput(model, prompt: torch.Tensor, ks, max_new: int, repeats: int) -> dict[int, tuple[float, float, float]]:
    """For each k: (seconds of the first ``compile=True`` call, which compiles; median tokens/s of the
    next ``repeats`` calls; their median milliseconds per model call, prefill included)."""
    device = prompt.device
    mask = torch.ones_like(prompt)

    def call(k: int) -> tuple[float, float, int]:
        sync(device)
        start = time.perf_counter()
        out = mtp_plugins.generate(model, prompt, mask, strategy="ar" if k == 1 else "static", k=k,
                                   max_new_tokens=max_new, eos_token_id=[], pad_token_id=0, compile=True)
        sync(device)
        seconds = time.perf_counter() - start
        if out.stats.tokens != prompt.shape[0] * max_new:
            raise RuntimeError(f"compiled k={k}: {out.stats.tokens} tokens, expected {prompt.shape[0] * max_new}")
        return seconds, out.stats.tokens, out.stats.model_calls

    first = {k: call(k)[0] for k in ks}  # same shapes as the timed calls: everything compiles here
    runs: dict[int, list[tuple[float, int, int]]] = {k: [] for k in ks}
    for _ in range(repeats):
        for k in ks:
            runs[k].append(call(k))
    return {
        k: (first[k], statistics.median(t / s for s, t, _ in r), statistics.median(1000 * s / c for s, _, c in r))
        for k, r in runs.items()
    }


# --- report -------------------------------------------------------------------------------------


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        where = f"CPU {platform.processor() or platform.machine()} (torch threads: {torch.get_num_threads()})"
    import transformers

    return f"{where}; torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="of the 1B-shaped model")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and tiny sizes: checks the script in seconds")
    parser.add_argument("--batch-sizes", default=None, help="default 1,8,32 (tiny: 1,2,4)")
    parser.add_argument("--prompt-len", type=int, default=None,
                        help="prompt length, i.e. the cache of the pass costs (default 512; tiny 16)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (tiny 16)")
    parser.add_argument("--passes", type=int, default=None, help="timed passes per k (default 30; tiny 7)")
    parser.add_argument("--repeats", type=int, default=None, help="timed generate calls per k (default 3; tiny 1)")
    parser.add_argument("--compile-batches", default=None,
                        help="batch sizes of the compiled path (default 1,8; tiny 1; 'none' skips it)")
    parser.add_argument("--budget-s", type=float, default=400.0,
                        help="skip the tokens/s of the remaining batch sizes once this many seconds have passed")
    parser.add_argument("--out", type=Path, help="also write the markdown report here (atomically)")
    args = parser.parse_args()
    started = _STARTED

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; this check is for a GPU machine (--tiny --device cpu checks the script)")
    if device.type == "cpu" and not args.tiny:
        sys.exit("gpu_check: the Llama-3.2-1B-shaped model is for a GPU; on a CPU use --tiny")
    tiny = args.tiny
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,2,4" if tiny else "1,8,32")).split(",")]
    compile_arg = args.compile_batches or ("1" if tiny else "1,8")
    compile_batches = [] if compile_arg == "none" else [int(b) for b in compile_arg.split(",")]
    prompt_len = args.prompt_len or (16 if tiny else 512)
    max_new = args.max_new_tokens or (16 if tiny else 128)
    passes = args.passes or (7 if tiny else 30)
    repeats = args.repeats or (1 if tiny else 3)
    warmup = 2 if tiny else 5
    dtype = DTYPES[args.dtype]
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny matrices: threads only add noise on a shared CPU

    decode_passes = len(batch_sizes) * (len(KS) * (warmup + passes)
                                        + (repeats * sum(max_new // k for k in KS) + 2 * len(KS)))
    log(f"gpu_check: about {decode_passes} decode passes planned ({len(batch_sizes)} batch sizes: pass costs, "
        f"then generate with {repeats} timed calls per k); exactness on the device ...")
    t0 = time.perf_counter()
    checks, exact_setup = exactness(device, tiny)
    for name, ok, _ in checks:
        log(f"  {'PASS' if ok else 'FAIL'}: {name}")
    log(f"  ({exact_setup})")
    exact_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()

    shape = TINY if tiny else LLAMA_3_2_1B
    log(f"gpu_check: building the {'tiny' if tiny else 'Llama-3.2-1B-shaped'} random model ({args.dtype}) ...")
    t0 = time.perf_counter()
    model = build_llama(shape, device, dtype, seed=0)
    add_mask_token(model)
    params = sum(p.numel() for p in model.parameters())
    build_s = time.perf_counter() - t0
    log(f"  {params / 1e6:.1f} M parameters in {build_s:.0f} s")

    costs: dict[int, dict[int, float]] = {}
    rates: dict[int, dict[int, float] | None] = {}
    peaks: dict[int, float | None] = {}
    section_s: dict[int, tuple[float, float]] = {}
    compiled: dict[int, dict[int, tuple[float, float, float]] | None] = {}

    def render(final: bool) -> str:
        """The markdown report of what has run so far (written after every section, so a run cut
        short by a timeout still leaves its measurements)."""
        elapsed = time.perf_counter() - started
        ratio = costs[1][8] / costs[1][1] if 1 in costs else None
        lines = [
            "# GPU check: MTP decode cost on a Llama-3.2-1B-shaped model" + (" (--tiny: checks the script only)" if tiny else ""),
            "",
            f"Command: `python {' '.join(sys.argv)}`  ",
            f"Date: {date.today()}; device: {machine(device)}  ",
            f"Model: {'tiny' if tiny else 'Llama-3.2-1B-shaped'} random Llama ({params / 1e6:.1f} M parameters, "
            f"{shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, {shape['num_attention_heads']}/"
            f"{shape['num_key_value_heads']} heads, vocab {shape['vocab_size']} + 1 mask token), {args.dtype}, sdpa. "
            f"ms/pass: median of {passes} passes (after {warmup} warm-up) of 1 token + (k-1) mask slots at a "
            f"{prompt_len}-token cache, mask entries cropped, synchronized. tokens/s: `mtp_plugins.generate`, "
            f"random {prompt_len}-token prompts, exactly {max_new} new tokens per row (no EOS), prefill included, "
            f"median of {repeats}. k=1 is `ar`; k > 1 is `static` (emits all k proposals every pass).",
            "",
            HEADER,
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for batch in batch_sizes:
            if batch not in costs:
                lines.append(f"| {batch} | - | not run | | | |")
                continue
            c, r = costs[batch], rates.get(batch)
            for k in KS:
                tps = f"{r[k]:.0f}" if r else "skipped"
                tps_ratio = f"{r[k] / r[1]:.2f}x" if r else "-"
                label = "1 (ar)" if k == 1 else str(k)
                lines.append(f"| {batch} | {label} | {1000 * c[k]:.2f} | {c[k] / c[1]:.2f}x | {tps} | {tps_ratio} |")
        if compile_batches:
            lines += [
                "",
                "The compiled path (`compile=True`: static KV cache, `torch.compile` mode "
                f"{'reduce-overhead (CUDA graphs)' if device.type == 'cuda' else 'default'}), same prompts and lengths; "
                "tokens/s eager is the table above; ms/call = wall seconds / model calls of a `generate` call "
                f"(prefill and bookkeeping included), median of {repeats}:",
                "",
                COMPILED_HEADER,
                "|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for batch in compile_batches:
                c = compiled.get(batch)
                for k in COMPILED_KS:
                    label = "1 (ar)" if k == 1 else str(k)
                    if c is None:
                        lines.append(f"| {batch} | {label} | skipped | | | | | |")
                        continue
                    first, rate, ms = c[k]
                    eager = (rates.get(batch) or {}).get(k)
                    lines.append(
                        f"| {batch} | {label} | {first:.1f} | {f'{eager:.0f}' if eager else '-'} | {rate:.0f} | "
                        f"{f'{rate / eager:.2f}x' if eager else '-'} | {ms:.2f} | {ms / c[1][2]:.2f}x |"
                    )
        lines += ["", f"Exactness on the device ({exact_setup}):", ""]
        lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok, _ in checks]
        lines += ["", "Target:", ""]
        if ratio is not None:
            verdict = "MET" if ratio <= TARGET else "NOT MET"
            lines.append(f"- static k=8 pass / ar pass at batch 1 = {ratio:.3f} (target <= {TARGET}): {verdict}"
                         + (" (tiny CPU run: not a measurement of the target)" if tiny or device.type != "cuda" else ""))
        else:
            lines.append("- static k=8 pass / ar pass at batch 1: not measured (batch 1 not in --batch-sizes)")
        lines += ["", "Peak memory (torch.cuda.max_memory_allocated, weights included):", ""]
        for batch in batch_sizes:
            peak = peaks.get(batch)
            lines.append(f"- batch {batch}: " + (f"{peak:.2f} GiB" if peak is not None else "n/a (not on CUDA)"))
        lines += [
            "",
            f"Elapsed: {elapsed:.0f} s in all, imports included (exactness {exact_s:.0f} s, model build {build_s:.0f} s; "
            + "; ".join(f"batch {b}: passes {p:.0f} s, generate {g:.0f} s" for b, (p, g) in section_s.items()) + ")",
            "",
        ]
        if not final:
            lines.insert(1, "\nPartial report: the run has not finished (or was cut short).")
        return "\n".join(lines)

    def checkpoint(section: str) -> None:
        if args.out:
            write_atomic(args.out, render(final=False))
            log(f"gpu_check: {section} done; partial report in {args.out}")

    def eager_section(batch: int) -> None:
        prompt = random_prompts(batch, prompt_len, shape["vocab_size"], device, seed=batch)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        costs[batch] = pass_costs(model, prompt, KS, passes, warmup)
        t1 = time.perf_counter()
        log(f"gpu_check: batch {batch} pass costs (ms): "
            + ", ".join(f"k={k} {1000 * s:.2f}" for k, s in costs[batch].items()) + f" [{t1 - t0:.0f} s]")
        if time.perf_counter() - started > args.budget_s:
            rates[batch] = None
            log(f"gpu_check: batch {batch} tokens/s skipped: past the {args.budget_s:.0f} s budget")
        else:
            rates[batch] = throughput(model, prompt, KS, max_new, repeats)
            log(f"gpu_check: batch {batch} tokens/s: "
                + ", ".join(f"k={k} {r:.0f}" for k, r in rates[batch].items()) + f" [{time.perf_counter() - t1:.0f} s]")
        section_s[batch] = (t1 - t0, time.perf_counter() - t1)
        peaks[batch] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        checkpoint(f"batch {batch}")

    def compiled_section(batch: int) -> None:
        if time.perf_counter() - started > args.budget_s:
            compiled[batch] = None
            log(f"gpu_check: batch {batch} compiled path skipped: past the {args.budget_s:.0f} s budget")
            return
        prompt = random_prompts(batch, prompt_len, shape["vocab_size"], device, seed=batch)
        t0 = time.perf_counter()
        compiled[batch] = compiled_throughput(model, prompt, COMPILED_KS, max_new, repeats)
        log(f"gpu_check: batch {batch} compiled: "
            + ", ".join(f"k={k} first call {f:.0f} s, {r:.0f} tokens/s, {ms:.2f} ms/call"
                        for k, (f, r, ms) in compiled[batch].items()) + f" [{time.perf_counter() - t0:.0f} s]")
        checkpoint(f"batch {batch} compiled")

    # Each batch's compiled run follows its eager run, so a run cut short keeps the most useful part.
    for batch in batch_sizes:
        eager_section(batch)
        if batch in compile_batches:
            compiled_section(batch)
    for batch in compile_batches:
        if batch not in batch_sizes:
            compiled_section(batch)

    report = render(final=True)
    print(report, flush=True)
    if args.out:
        write_atomic(args.out, report)
        log(f"gpu_check: wrote {args.out}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
