"""A seeded generator of GSM8K-style word problems with exact answers, for offline training and
evaluation (the product's own data: no download, no ``../shared``).

Each problem has a ``question``, an ``answer`` written the way GSM8K writes them (one reasoning
step per line with ``<<expression=result>>`` calculator notes, then ``#### N``) and the integer
``final``. Problems take two to four arithmetic steps over everyday templates (shopping, rates,
sharing, ages, travel, discounts, ...). The splits are disjoint by construction: a question belongs
to the test split exactly when a hash of its text says so, and the train split skips those.

    >>> rows = problems("train", 3)
    >>> rows[0]["answer"].splitlines()[-1].startswith("#### ")
    True

Two difficulty levels (``LEVELS``): ``standard`` and ``easy`` (one product of numbers 2..5: the
demo's level, which SmolLM2-135M can do; its answers first restate the question's two facts, one
per line, then take the step, as GSM8K's worked answers often do). ``mtp-train --data synthetic-gsm[:N][:LEVEL]`` trains on
N train problems of that level (default 20000, standard; fields
``question`` and ``answer``, and ``prompt``/``completion`` laid out exactly as the task prompts:
``Question: ...\nAnswer:`` then `` answer``, for ``--template completion``); the lm-eval tasks
``synthetic_gsm`` and ``synthetic_gsm_easy`` (``dataset_kwargs: difficulty``) evaluate on the test split.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import Any

SPLITS = ("train", "test")
DEFAULT_TRAIN_SIZE = 20000
DEFAULT_TEST_SIZE = 500
TEST_SHARE = 8  # one question in 8 (by hash) belongs to the test split

NAMES = [
    ("Mia", "she", "her"), ("Liam", "he", "his"), ("Ava", "she", "her"), ("Noah", "he", "his"),
    ("Zoe", "she", "her"), ("Omar", "he", "his"), ("Lena", "she", "her"), ("Ravi", "he", "his"),
    ("Sofia", "she", "her"), ("Jack", "he", "his"), ("Emma", "she", "her"), ("Diego", "he", "his"),
    ("Hana", "she", "her"), ("Tom", "he", "his"), ("Grace", "she", "her"), ("Felix", "he", "his"),
]
FRIENDS = ["Ben", "Chloe", "Sam", "Nina", "Leo", "Ivy", "Max", "Ruby"]
PLANTS = ["roses", "tulips", "carrots", "tomatoes", "beans", "sunflowers"]
ITEMS = [("pencil", "pencils"), ("notebook", "notebooks"), ("apple", "apples"), ("sticker", "stickers"),
         ("marble", "marbles"), ("cupcake", "cupcakes"), ("card", "cards"), ("balloon", "balloons")]


def _shopping(r: random.Random) -> tuple[str, list[str], int]:
    (name, he, his), (item, items) = r.choice(NAMES), r.choice(ITEMS)
    n, price = r.randint(2, 9), r.randint(2, 12)
    cost = n * price
    bill = r.choice([b for b in (20, 50, 100) if b > cost] or [cost + 10])
    question = f"{name} buys {n} {items} that cost ${price} each. {he.capitalize()} pays with a ${bill} bill. How much change does {he} get?"
    steps = [f"The {items} cost {n} * {price} = $<<{n}*{price}={cost}>>{cost}.",
             f"So {his} change is {bill} - {cost} = $<<{bill}-{cost}={bill - cost}>>{bill - cost}."]
    return question, steps, bill - cost


def _sharing(r: random.Random) -> tuple[str, list[str], int]:
    (name, he, his), friend, (item, items) = r.choice(NAMES), r.choice(FRIENDS), r.choice(ITEMS)
    have, give, more = r.randint(20, 60), r.randint(3, 15), r.randint(4, 20)
    left = have - give
    question = f"{name} has {have} {items}. {he.capitalize()} gives {give} {items} to {friend} and then buys {more} more. How many {items} does {name} have now?"
    steps = [f"After giving some away, {name} has {have} - {give} = <<{have}-{give}={left}>>{left} {items}.",
             f"After buying more, {he} has {left} + {more} = <<{left}+{more}={left + more}>>{left + more} {items}."]
    return question, steps, left + more


def _reading(r: random.Random) -> tuple[str, list[str], int]:
    name, he, his = r.choice(NAMES)
    per_day, days, last = r.randint(5, 30), r.randint(2, 7), r.randint(3, 25)
    first = per_day * days
    question = f"{name} reads {per_day} pages every day for {days} days. On the next day {he} reads {last} pages. How many pages does {name} read in all?"
    steps = [f"In {days} days {he} reads {per_day} * {days} = <<{per_day}*{days}={first}>>{first} pages.",
             f"In all {he} reads {first} + {last} = <<{first}+{last}={first + last}>>{first + last} pages."]
    return question, steps, first + last


def _boxes(r: random.Random) -> tuple[str, list[str], int]:
    (name, he, his), (item, items) = r.choice(NAMES), r.choice(ITEMS)
    boxes, each = r.randint(3, 9), r.randint(4, 12)
    total = boxes * each
    taken = r.randint(2, total - 1)
    question = f"There are {boxes} boxes with {each} {items} in each box. {name} takes out {taken} {items}. How many {items} are left in the boxes?"
    steps = [f"The boxes hold {boxes} * {each} = <<{boxes}*{each}={total}>>{total} {items}.",
             f"After {name} takes some, {total} - {taken} = <<{total}-{taken}={total - taken}>>{total - taken} {items} are left."]
    return question, steps, total - taken


def _wages(r: random.Random) -> tuple[str, list[str], int]:
    name, he, his = r.choice(NAMES)
    wage, monday, tuesday = r.randint(8, 25), r.randint(2, 8), r.randint(2, 8)
    hours = monday + tuesday
    question = f"{name} earns ${wage} an hour. {he.capitalize()} works {monday} hours on Monday and {tuesday} hours on Tuesday. How much does {name} earn in these two days?"
    steps = [f"{name} works {monday} + {tuesday} = <<{monday}+{tuesday}={hours}>>{hours} hours.",
             f"{he.capitalize()} earns {hours} * {wage} = $<<{hours}*{wage}={hours * wage}>>{hours * wage}."]
    return question, steps, hours * wage


def _baking(r: random.Random) -> tuple[str, list[str], int]:
    name, he, his = r.choice(NAMES)
    bags, per_bag = r.randint(2, 8), r.randint(3, 12)
    cookies = bags * per_bag
    eaten = r.randint(1, per_bag - 1)
    question = f"{name} bakes {cookies} cookies and puts them equally into {bags} bags. {he.capitalize()} eats {eaten} cookies from one bag. How many cookies are left in that bag?"
    steps = [f"Each bag gets {cookies} / {bags} = <<{cookies}/{bags}={per_bag}>>{per_bag} cookies.",
             f"That bag has {per_bag} - {eaten} = <<{per_bag}-{eaten}={per_bag - eaten}>>{per_bag - eaten} cookies left."]
    return question, steps, per_bag - eaten


def _times_as_many(r: random.Random) -> tuple[str, list[str], int]:
    (name, he, his), friend, (item, items) = r.choice(NAMES), r.choice(FRIENDS), r.choice(ITEMS)
    have, times = r.randint(3, 25), r.randint(2, 5)
    other = have * times
    question = f"{name} has {have} {items}. {friend} has {times} times as many {items} as {name}. How many {items} do they have together?"
    steps = [f"{friend} has {have} * {times} = <<{have}*{times}={other}>>{other} {items}.",
             f"Together they have {have} + {other} = <<{have}+{other}={have + other}>>{have + other} {items}."]
    return question, steps, have + other


def _ages(r: random.Random) -> tuple[str, list[str], int]:
    (name, he, his), friend = r.choice(NAMES), r.choice(FRIENDS)
    age, older, years = r.randint(5, 40), r.randint(2, 15), r.randint(2, 10)
    now = age + older
    question = f"{name} is {age} years old. {friend} is {older} years older than {name}. How old will {friend} be in {years} years?"
    steps = [f"{friend} is {age} + {older} = <<{age}+{older}={now}>>{now} years old now.",
             f"In {years} years {friend} will be {now} + {years} = <<{now}+{years}={now + years}>>{now + years} years old."]
    return question, steps, now + years


def _travel(r: random.Random) -> tuple[str, list[str], int]:
    s1, h1, s2, h2 = r.randint(20, 70), r.randint(2, 5), r.randint(20, 70), r.randint(1, 4)
    d1, d2 = s1 * h1, s2 * h2
    question = f"A train travels at {s1} miles per hour for {h1} hours and then at {s2} miles per hour for {h2} hours. How many miles does it travel?"
    steps = [f"First it travels {s1} * {h1} = <<{s1}*{h1}={d1}>>{d1} miles.",
             f"Then it travels {s2} * {h2} = <<{s2}*{h2}={d2}>>{d2} miles.",
             f"In total it travels {d1} + {d2} = <<{d1}+{d2}={d1 + d2}>>{d1 + d2} miles."]
    return question, steps, d1 + d2


def _discount(r: random.Random) -> tuple[str, list[str], int]:
    name, he, his = r.choice(NAMES)
    percent = r.choice([10, 20, 25, 50])
    price = r.randint(2, 12) * (100 // {10: 10, 20: 20, 25: 25, 50: 50}[percent]) * 5
    off = price * percent // 100
    sale, count = price - off, r.randint(2, 4)
    question = f"A jacket costs ${price}. It is on sale for {percent}% off. {name} buys {count} jackets. How much does {he} pay?"
    steps = [f"The discount is {price} * {percent} / 100 = $<<{price}*{percent}/100={off}>>{off}.",
             f"One jacket costs {price} - {off} = $<<{price}-{off}={sale}>>{sale}.",
             f"{count} jackets cost {count} * {sale} = $<<{count}*{sale}={count * sale}>>{count * sale}."]
    return question, steps, count * sale


def _savings(r: random.Random) -> tuple[str, list[str], int]:
    name, he, his = r.choice(NAMES)
    start, weekly, weeks, spent = r.randint(10, 50), r.randint(3, 15), r.randint(2, 6), r.randint(5, 20)
    saved = weekly * weeks
    total = start + saved
    question = (f"{name} has ${start} in {his} piggy bank. {he.capitalize()} saves ${weekly} every week for {weeks} weeks, "
                f"then spends ${spent} on a game. How much money does {he} have left?")
    steps = [f"{he.capitalize()} saves {weekly} * {weeks} = $<<{weekly}*{weeks}={saved}>>{saved}.",
             f"Then {he} has {start} + {saved} = $<<{start}+{saved}={total}>>{total}.",
             f"After the game {he} has {total} - {spent} = $<<{total}-{spent}={total - spent}>>{total - spent}."]
    return question, steps, total - spent


def _product(a: int, b: int, unit: str = "") -> str:
    """The easy level's one step: ``a * b = <<a*b=c>>c`` (``unit`` before the result: "$")."""
    return f"{a} * {b} = {unit}<<{a}*{b}={a * b}>>{a * b}"


def _groups(r: random.Random) -> tuple[str, list[str], int]:
    (name, he, his), (item, items) = r.choice(NAMES), r.choice(ITEMS)
    bags, each = r.randint(2, 5), r.randint(2, 5)
    question = f"{name} has {bags} bags with {each} {items} in each bag. How many {items} does {name} have?"
    steps = [f"{name} has {bags} bags.", f"Each bag has {each} {items}.",
             f"So {name} has {_product(bags, each)} {items}."]
    return question, steps, bags * each


def _price(r: random.Random) -> tuple[str, list[str], int]:
    (name, he, his), (item, items) = r.choice(NAMES), r.choice(ITEMS)
    n, price = r.randint(2, 5), r.randint(2, 5)
    question = f"{name} buys {n} {items}. Each one costs ${price}. How much does {he} pay?"
    steps = [f"{name} buys {n} {items}.", f"Each one costs ${price}.",
             f"So {he} pays {_product(n, price, '$')}."]
    return question, steps, n * price


def _rows(r: random.Random) -> tuple[str, list[str], int]:
    plant, rows, each = r.choice(PLANTS), r.randint(2, 5), r.randint(2, 5)
    name, he, his = r.choice(NAMES)
    question = f"{name}'s garden has {rows} rows with {each} {plant} in each row. How many {plant} are in the garden?"
    steps = [f"The garden has {rows} rows.", f"Each row has {each} {plant}.",
             f"So the garden has {_product(rows, each)} {plant}."]
    return question, steps, rows * each


def _pages(r: random.Random) -> tuple[str, list[str], int]:
    (name, he, his), pages, days = r.choice(NAMES), r.randint(2, 5), r.randint(2, 5)
    question = f"{name} reads {pages} pages every day. How many pages does {he} read in {days} days?"
    steps = [f"{name} reads {pages} pages every day.", f"{he.capitalize()} reads for {days} days.",
             f"So {he} reads {_product(pages, days)} pages."]
    return question, steps, pages * days


def _packs(r: random.Random) -> tuple[str, list[str], int]:
    (name, he, his), (item, items) = r.choice(NAMES), r.choice(ITEMS)
    packs, each = r.randint(2, 5), r.randint(2, 5)
    question = f"{name} buys {packs} packs of {items}. Each pack has {each} {items}. How many {items} does {he} buy?"
    steps = [f"{name} buys {packs} packs.", f"Each pack has {each} {items}.",
             f"So {he} buys {_product(packs, each)} {items}."]
    return question, steps, packs * each


Template = Callable[[random.Random], tuple[str, list[str], int]]
#: Difficulty levels: ``standard`` (two or three steps over numbers up to a few hundred, the
#: default) and ``easy`` (the question's two facts restated, then one product of numbers 2..5: what a
#: 135M model can do, and an answer it is sure of for most of its tokens).
LEVELS: dict[str, list[Template]] = {
    "standard": [_shopping, _sharing, _reading, _boxes, _wages, _baking, _times_as_many, _ages, _travel, _discount, _savings],
    "easy": [_groups, _price, _rows, _pages, _packs],
}
DEFAULT_LEVEL = "standard"


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise ValueError(f"difficulty {level!r}: use one of {', '.join(LEVELS)}")
    return level


def in_test_split(question: str) -> bool:
    return hashlib.sha256(question.encode("utf-8")).digest()[0] % TEST_SHARE == 0


def problems(split: str, n: int, seed: int = 0, difficulty: str = DEFAULT_LEVEL) -> list[dict[str, Any]]:
    """``n`` problems of ``split`` ("train" or "test") at ``difficulty`` (a key of ``LEVELS``); the same
    arguments give the same rows, and a larger ``n`` extends a smaller one. Questions are unique within
    a split; the splits never share a question (at any level)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: use one of {', '.join(SPLITS)}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r}: the number of problems must be an integer >= 0")
    templates = LEVELS[check_level(difficulty)]
    tag = "" if difficulty == DEFAULT_LEVEL else f":{difficulty}"  # the standard level's rows stay as they were
    rng = random.Random(f"synthetic-gsm:{seed}:{split}{tag}")
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    want_test = split == "test"
    misses = 0
    while len(rows) < n:
        if misses > 20000:  # the level's templates ran out of distinct questions
            raise ValueError(f"{n} distinct {split} problems at difficulty {difficulty!r}: the level has only about "
                             f"{len(rows)}; ask for fewer")
        question, steps, final = templates[rng.randrange(len(templates))](rng)
        if question in seen or in_test_split(question) != want_test:
            misses += 1
            continue
        misses = 0
        seen.add(question)
        answer = "\n".join(steps) + f"\n#### {final}"
        rows.append({"question": question, "answer": answer, "final": final,
                     "prompt": f"Question: {question}\nAnswer:", "completion": f" {answer}"})
    return rows


def parse_source(spec: str) -> tuple[int, str] | None:
    """``synthetic-gsm[:N][:LEVEL]`` -> (N train problems, difficulty level); None if ``spec`` is not one.
    N defaults to 20000, LEVEL to ``standard``; e.g. ``synthetic-gsm:4000:easy``, ``synthetic-gsm:easy``."""
    if spec != "synthetic-gsm" and not spec.startswith("synthetic-gsm:"):
        return None
    size, level = DEFAULT_TRAIN_SIZE, DEFAULT_LEVEL
    parts = [part for part in spec.split(":")[1:] if part]
    if len(parts) > 2:
        raise ValueError(f"--data {spec}: write synthetic-gsm[:N][:LEVEL], e.g. synthetic-gsm:4000:easy")
    for part in parts:
        if part in LEVELS:
            level = part
        elif part.isdigit() and int(part) >= 1:
            size = int(part)
        else:
            raise ValueError(f"--data {spec}: {part!r} after 'synthetic-gsm:' is neither a size (a whole number >= 1) "
                             f"nor a difficulty ({', '.join(LEVELS)})")
    return size, level


def dataset(train_size: int = DEFAULT_TRAIN_SIZE, test_size: int = DEFAULT_TEST_SIZE, seed: int = 0,
            difficulty: str = DEFAULT_LEVEL, **_: Any) -> Any:
    """A ``datasets.DatasetDict`` with train and test splits (what the lm-eval task loads)."""
    from datasets import Dataset, DatasetDict

    return DatasetDict({
        "train": Dataset.from_list(problems("train", int(train_size), seed, difficulty)),
        "test": Dataset.from_list(problems("test", int(test_size), seed, difficulty)),
    })
