"""The offline GSM8K-style problem generator: exact answers, seeded, disjoint splits; as mtp-train data."""

from __future__ import annotations

import re

import pytest

from mtp_plugins import synthetic

STEP = re.compile(r"<<([0-9+\-*/ ]+)=(-?\d+)>>(-?\d+)")


def test_every_step_and_final_answer_is_exact():
    rows = synthetic.problems("train", 400) + synthetic.problems("test", 100)
    kinds = set()
    for row in rows:
        *steps, last = row["answer"].splitlines()
        assert last == f"#### {row['final']}" and row["final"] >= 0
        assert 2 <= len(steps) <= 4
        results = []
        for step in steps:
            (expression, result, shown), = STEP.findall(step)
            assert eval(expression) == int(result) == int(shown), step  # noqa: S307 (digits and operators only)
            results.append(int(result))
        assert results[-1] == row["final"]
        kinds.add(row["question"].split()[1])
    assert len(kinds) > 8  # many templates, not one


def test_seeded_prefix_stable_and_splits_disjoint():
    assert synthetic.problems("train", 50) == synthetic.problems("train", 50)
    assert synthetic.problems("train", 80)[:50] == synthetic.problems("train", 50)
    assert synthetic.problems("train", 50, seed=1) != synthetic.problems("train", 50)
    train = {r["question"] for r in synthetic.problems("train", 5000)}
    test = {r["question"] for r in synthetic.problems("test", 500)}
    assert len(train) == 5000 and len(test) == 500 and not train & test
    assert all(synthetic.in_test_split(q) for q in test) and not any(synthetic.in_test_split(q) for q in train)


@pytest.mark.parametrize(("spec", "expected"), [("synthetic-gsm", 20000), ("synthetic-gsm:300", 300), ("gsm8k", None), ("synthetic-gsmx", None)])
def test_data_source_names(spec, expected):
    assert synthetic.parse_source(spec) == expected


@pytest.mark.parametrize("spec", ["synthetic-gsm:0", "synthetic-gsm:ten", "synthetic-gsm:"])
def test_bad_sizes_are_named(spec):
    if spec == "synthetic-gsm:":
        assert synthetic.parse_source(spec) == 20000
        return
    with pytest.raises(ValueError, match=f"--data {spec}: the size after 'synthetic-gsm:' must be a whole number >= 1"):
        synthetic.parse_source(spec)


def test_mtp_train_reads_the_synthetic_source(tmp_path):
    from train_cli.config import ConfigError, build_config
    from train_cli.data import load_rows

    config = build_config(data="synthetic-gsm:40", prompt_field="question", response_field="answer", eval_rows=6,
                          output_dir=str(tmp_path))
    train, held = load_rows(config)
    assert len(train) == 40 and len(held) == 6
    assert train[0] == synthetic.problems("train", 1)[0]
    test = {r["question"] for r in synthetic.problems("test", 500)}
    assert not ({r["question"] for r in train} | {r["question"] for r in held}) & test  # never the task's test split
    with pytest.raises(ConfigError, match="--prompt-field 'query': no such field in synthetic-gsm:40; its fields are question, answer, final, prompt, completion"):
        load_rows(build_config(data="synthetic-gsm:40", output_dir=str(tmp_path)))
