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


@pytest.mark.parametrize(("spec", "expected"), [
    ("synthetic-gsm", (20000, "standard")), ("synthetic-gsm:300", (300, "standard")), ("synthetic-gsm:", (20000, "standard")),
    ("synthetic-gsm:easy", (20000, "easy")), ("synthetic-gsm:300:easy", (300, "easy")), ("synthetic-gsm:easy:300", (300, "easy")),
    ("gsm8k", None), ("synthetic-gsmx", None)])
def test_data_source_names(spec, expected):
    assert synthetic.parse_source(spec) == expected


@pytest.mark.parametrize(("spec", "message"), [
    ("synthetic-gsm:0", "'0' after 'synthetic-gsm:' is neither a size (a whole number >= 1) nor a difficulty (standard, easy)"),
    ("synthetic-gsm:ten", "'ten' after 'synthetic-gsm:' is neither a size"),
    ("synthetic-gsm:300:hard", "'hard' after 'synthetic-gsm:' is neither a size"),
    ("synthetic-gsm:1:easy:2", "write synthetic-gsm[:N][:LEVEL]"),
])
def test_bad_sources_are_named(spec, message):
    with pytest.raises(ValueError, match=re.escape(f"--data {spec}: {message}")):
        synthetic.parse_source(spec)


def test_easy_level_is_one_step_small_numbers_and_disjoint():
    train = synthetic.problems("train", 3000, difficulty="easy")
    test = synthetic.problems("test", 500, difficulty="easy")
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    for row in train[:300] + test[:100]:
        *facts, step, final = row["answer"].splitlines()
        assert final == f"#### {row['final']}" and len(facts) == 2  # the two facts restated, then one step
        numbers = [int(n) for n in re.findall(r"\d+", row["question"])]
        assert numbers and max(numbers) < 20
        assert all("<<" not in fact and re.findall(r"\d+", fact) and
                   set(re.findall(r"\d+", fact)) <= set(re.findall(r"\d+", row["question"])) for fact in facts)
        expression = re.search(r"<<(.+)=(\d+)>>", step)
        assert eval(expression.group(1)) == int(expression.group(2)) == row["final"]  # noqa: S307 (our own arithmetic)
    assert synthetic.problems("train", 50) == synthetic.problems("train", 50, difficulty="standard")  # the default level is unchanged
    assert synthetic.problems("train", 50, difficulty="easy")[0] != synthetic.problems("train", 50)[0]
    with pytest.raises(ValueError, match="difficulty 'hard': use one of standard, easy"):
        synthetic.problems("train", 1, difficulty="hard")


def test_a_level_that_runs_out_of_questions_is_refused(monkeypatch):
    monkeypatch.setitem(synthetic.LEVELS, "tiny", [lambda r: (f"What is {r.randint(1, 40)} + 1?", ["step"], 0)])
    with pytest.raises(ValueError, match=r"100 distinct train problems at difficulty 'tiny': the level has only about \d+; ask for fewer"):
        synthetic.problems("train", 100, difficulty="tiny")


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


@pytest.mark.parametrize(("task", "level"), [("synthetic_gsm", "standard"), ("synthetic_gsm_easy", "easy")])
def test_the_lm_eval_tasks_serve_their_levels_test_split(task, level):
    from mtp_plugins.lm_eval.sweep_args import task_manager

    loaded = task_manager().load_task_or_group([task])[task]
    docs = list(loaded.test_docs())
    assert len(docs) == 500
    assert [d["question"] for d in docs[:20]] == [r["question"] for r in synthetic.problems("test", 20, difficulty=level)]
    shots = {d["question"] for d in loaded.fewshot_docs()}
    assert shots and not shots & {d["question"] for d in docs}  # the exemplars come from the train split
    assert loaded.doc_to_text(docs[0]) == f"Question: {docs[0]['question']}\nAnswer:"
