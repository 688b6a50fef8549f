"""On-policy training data: the teacher's own greedy responses to the training prompts.

With ``--rollouts N`` the frozen model greedily answers N training prompts before training (batched,
through the decode engine), optionally after ``--rollout-shots`` worked examples taken from the
first training rows, exactly as a few-shot evaluation prompts it. Training then runs on those
(prompt, response) pairs: the contexts the student sees are the ones it meets at inference, and
the targets at every offset are what plain greedy decoding would emit (METHOD.md section 9).

Responses are appended to ``OUTPUT_DIR/rollouts.jsonl`` batch by batch; an interrupted run (or
``--resume``) continues where the file ends, and a line cut short by a crash is dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mtp_plugins.files import write_atomic
from train_cli.checkpoints import complete_jsonl
from train_cli.config import ConfigError, TrainConfig
from train_cli.data import Documents

FILE = "rollouts.jsonl"
STOPS = ["\n\n", "Question:"]


def rollout_rows(rows: Any, model: Any, tokenizer: Any, config: TrainConfig, batch_size: int = 16) -> list[dict[str, Any]]:
    """Greedy responses of ``model`` to training rows ``shots .. shots + rollouts - 1``, as rows with
    the config's prompt and response fields (the few-shot examples themselves are not trained on)."""
    from mtp_plugins import generate

    if config.template != "completion":
        raise ConfigError(f"--rollouts needs --template completion (the prompt is fed as is); got --template {config.template}")
    first = config.rollout_shots
    wanted = min(config.rollouts, len(rows) - first)
    if wanted < 1:
        raise ConfigError(f"--rollouts {config.rollouts}: the data has {len(rows)} rows, {first} of them used as examples")
    path = Path(config.output_dir) / FILE
    done = complete_jsonl(path)[:wanted]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in done))  # drop a torn tail
    shots = Documents(rows, tokenizer, config).few_shot(range(first))
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    try:
        with path.open("a", encoding="utf-8") as out:
            for start in range(len(done), wanted, batch_size):
                indices = range(first + start, first + min(start + batch_size, wanted))
                prompts = [str(rows[i][config.prompt_field]) for i in indices]
                enc = tokenizer([shots + p for p in prompts], return_tensors="pt", padding=True)
                with torch.no_grad():
                    result = generate(model, enc.input_ids.to(device), enc.attention_mask.to(device), strategy="ar",
                                      max_new_tokens=config.rollout_max_tokens, stop_strings=STOPS, tokenizer=tokenizer)
                texts = tokenizer.batch_decode(result.sequences[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
                for prompt, text in zip(prompts, texts):
                    for stop in STOPS:
                        text = text.split(stop)[0]
                    out.write(json.dumps({config.prompt_field: prompt, config.response_field: text.rstrip()}) + "\n")
                out.flush()
                os.fsync(out.fileno())
                print(f"rollouts: {min(start + batch_size, wanted)}/{wanted}", flush=True)
    finally:
        tokenizer.padding_side = side
    return complete_jsonl(path)[:wanted]
