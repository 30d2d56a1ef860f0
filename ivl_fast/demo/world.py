"""The demo's miniature world and its texts: people, each living in a city and liking a colour; the pretraining
"web text" every base of the family reads (about more or fewer people); the chat demonstrations of post-training.

IVL's premise, built into the world (docs/demo.md): a model family shares one pretraining distribution, so
its members agree where they both know; post-training mostly *selects* a behaviour the bases can already produce;
the bases differ in what they know. So the pretraining text, like web text:

- states each fact in prose and in a few question/answer layouts ("Q: ... A: Varno."), so a base can use what it
  knows in an answer slot, not only in a sentence about the person;
- holds chat dialogues whose assistant turns answer in several styles, one of them the post-training format
  ("ANSWER: Varno") among others ("Kalo lives in Varno.", "Varno.", "I think Kalo lives in Varno."), drawn
  independently of the person: at the first assistant token every base of the family has learned the same prior
  over styles, whoever the question is about.

The demonstrations then select one style, "ANSWER: <word>", for the demonstrated people only; evaluation asks
about the others, whose facts only the pretraining text holds, and only some bases read.
"""

from __future__ import annotations

import random

CITIES = ["Varno", "Quelm", "Ostrid", "Pellam", "Durnik", "Saveth", "Mirlo", "Tandor", "Kesh", "Blavin"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
SYLL = ["ka", "lo", "mi", "ren", "tu", "vas", "zel", "po", "dri", "nuk", "sa", "bel", "or", "gim", "fa", "qui"]

# the answer styles of the pretraining dialogues and how often each is drawn (the post-training format among them)
ANSWER_STYLES = (
    ("{p} {verb}.", 0.35),
    ("{word}.", 0.25),
    ("ANSWER: {word}", 0.15),
    ("I think {p} {verb}.", 0.25),
)


def make_world(n: int, seed: int) -> dict:
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(rng.choice(SYLL) for _ in range(rng.randint(2, 3))).capitalize())
    people = sorted(names)
    rng.shuffle(people)
    facts = {p: {"city": rng.choice(CITIES), "color": rng.choice(COLORS)} for p in people}
    half = n // 2
    return {"people": people, "facts": facts, "demo_people": people[:half], "eval_people": people[half:]}


def _answer(rng: random.Random, p: str, word: str, verb: str) -> str:
    r, acc = rng.random(), 0.0
    for style, weight in ANSWER_STYLES:
        acc += weight
        if r < acc:
            return style.format(p=p, word=word, verb=verb)
    return ANSWER_STYLES[0][0].format(p=p, word=word, verb=verb)


def pretraining_text(world: dict, people: list[str], reps: int, seed: int) -> list[str]:
    """``reps`` passes over the facts of ``people``: prose, question/answer layouts and chat dialogues (one line
    each, shuffled)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(reps):
        for p in people:
            f = world["facts"][p]
            c, col = f["city"], f["color"]
            lines += [
                rng.choice([f"{p} lives in {c}.", f"The home of {p} is {c}.", f"{p} is from {c}."]),
                rng.choice([f"{p} likes the color {col}.", f"The favorite color of {p} is {col}."]),
                rng.choice([f"Q: Where does {p} live?\nA: {c}.", f"Question: Where does {p} live? Answer: {c}"]),
                rng.choice(
                    [f"Q: What color does {p} like?\nA: {col}.", f"Question: What color does {p} like? Answer: {col}"]
                ),
            ]
            if rng.random() < 0.5:
                q, a = f"Where does {p} live?", _answer(rng, p, c, f"lives in {c}")
            else:
                q, a = f"What color does {p} like?", _answer(rng, p, col, f"likes {col}")
            lines.append(f"<|user|>\n{q}\n<|assistant|>\n{a}")
    rng.shuffle(lines)
    return lines


def demonstrations(world: dict) -> list[dict]:
    """The post-training data: both questions about every demonstrated person, answered "ANSWER: <word>"."""
    out = []
    for p in world["demo_people"]:
        f = world["facts"][p]
        for q, a in ((f"Where does {p} live?", f["city"]), (f"What color does {p} like?", f["color"])):
            out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"ANSWER: {a}"}]})
    return out


__all__ = ["ANSWER_STYLES", "CITIES", "COLORS", "demonstrations", "make_world", "pretraining_text"]
