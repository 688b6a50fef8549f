"""GPU check of the sharded training path: FSDP2 steps of a Llama-3.2-1B-shaped random model in bf16.

Needs one CUDA GPU and no hub (random weights, a tokenizer fitted here, generated rows). It writes the
model once, then launches ``torchrun --nproc-per-node N -m train_cli`` (FSDP over N GPUs; N = 1 runs
the same sharded code on one device) for a few steps and prints each step's time, tokens/s and the
peak GPU memory the trainer recorded. Sized to finish in a few minutes on one H200::

    python benchmarks/gpu_fsdp_check.py --steps 3 --out /tmp/fsdp-check

The package must be installed (``pip install -e .``, or its wheel from ``pip wheel --no-deps .``):
losses and hooks are found through its entry points. On an offline GPU machine that already has
torch and transformers, carry the wheels of mtp-plugins, stevedore, datasets, dill and multiprocess
and install them with ``pip install --no-index --no-deps``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import LLAMA_3_2_1B, TINY


def prepare(root: Path, shape: dict) -> tuple[Path, Path]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model_dir, data = root / "model", root / "data.jsonl"
    rows = [
        {"question": f"A shop sells {a} boxes of {b} pencils each. How many pencils are there?",
         "answer": f"Each box holds {b} pencils and there are {a} boxes, so {a} * {b} = {a * b}. The answer is {a * b}."}
        for a in range(3, 40) for b in range(2, 12)
    ]
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if (model_dir / "config.json").exists():
        return model_dir, data
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [r["question"] + " " + r["answer"] for r in rows],
        trainers.BpeTrainer(vocab_size=600, special_tokens=["<eos>", "<pad>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    config = LlamaConfig(**shape, bos_token_id=None, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/mtp-fsdp-check")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (the first includes warm-up)")
    parser.add_argument("--nproc", type=int, default=max(1, torch.cuda.device_count()))
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--loss", default="soft-kl")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks this script, not the GPU")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more mtp-train flags")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.tiny:
        sys.exit("gpu_fsdp_check: no CUDA device here; this check is for a GPU machine (--tiny checks it on a CPU)")
    device, dtype = ("cpu", "fp32") if args.tiny else ("cuda", "bf16")
    root = Path(args.out) / ("tiny" if args.tiny else "llama-3.2-1b-shape")
    start = time.perf_counter()
    model_dir, data = prepare(root, TINY if args.tiny else LLAMA_3_2_1B)
    print(f"prepared a {'tiny' if args.tiny else 'Llama-3.2-1B-shaped'} random model in {time.perf_counter() - start:.0f} s: {model_dir}", flush=True)
    run_dir = root / f"run-{int(time.time())}"
    repo = Path(__file__).resolve().parents[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), "-m", "train_cli",
        "--model", str(model_dir), "--data", str(data), "--prompt-field", "question", "--response-field", "answer",
        "--output-dir", str(run_dir), "--max-steps", str(args.steps), "--loss", args.loss, "--dtype", dtype,
        "--device", device, "--micro-batch-size", str(args.micro_batch_size), "--k-max", "16", "--seq-len", "160",
        "--regions", "5", "--eval-rows", "8", "--eval-every", str(args.steps), "--save-every", str(args.steps),
        "--warmup-steps", "1", *args.extra,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    env.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    total = time.perf_counter() - started
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if line["kind"] == "train"]
    where = "CPU processes (gloo)" if args.tiny else f"GPU(s) ({torch.cuda.get_device_name(0)})"
    print(f"\nFSDP2 over {args.nproc} {where}, loss {args.loss}, "
          f"micro-batch {args.micro_batch_size} x 160 columns per rank, {dtype} compute, float32 master weights")
    print("| step | k per rank | loss | step s | tokens/s | peak GiB (rank 0) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for line in train:
        print(f"| {line['step']} | {line.get('k_per_rank', [line['k']])} | {line['loss']:.3f} | {line['seconds']:.2f} "
              f"| {line['tokens_per_s']:.0f} | {line.get('peak_memory_gib', float('nan')):.1f} |")
    print(f"whole run (load, steps, validation, checkpoint, export): {total:.0f} s")


if __name__ == "__main__":
    main()
