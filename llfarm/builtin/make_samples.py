"""Regenerate the shipped sample datasets (deterministic; run from this folder).

The content is deliberately small and regular so that a few minutes of CPU training on the
built-in tiny model visibly teaches it: after the quickstart, greedy generation reproduces
most trained answers.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent / "data"

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Egypt", "Cairo"), ("Peru", "Lima"),
    ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Norway", "Oslo"), ("Greece", "Athens"),
    ("Cuba", "Havana"), ("Chile", "Santiago"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
]
COLORS = [
    ("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"),
    ("a banana", "yellow"), ("a tomato", "red"), ("an orange", "orange"), ("a plum", "purple"),
]
OPPOSITES = [
    ("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"),
    ("day", "night"), ("open", "closed"), ("wet", "dry"), ("old", "new"),
]
WRONG_CITY = {c: CAPITALS[(i + 5) % len(CAPITALS)][1] for i, (c, _) in enumerate(CAPITALS)}
WRONG_COLOR = {t: COLORS[(i + 3) % len(COLORS)][1] for i, (t, _) in enumerate(COLORS)}
WRONG_OPP = {w: OPPOSITES[(i + 2) % len(OPPOSITES)][1] for i, (w, _) in enumerate(OPPOSITES)}


def qa_pairs() -> list[tuple[str, str, str]]:
    """(prompt, good answer, bad answer) triples."""
    rows = []
    for country, city in CAPITALS:
        rows.append((f"What is the capital of {country}?", f"The capital of {country} is {city}.",
                     f"The capital of {country} is {WRONG_CITY[country]}."))
    for thing, color in COLORS:
        rows.append((f"What color is {thing}?", f"The color of {thing} is {color}.",
                     f"The color of {thing} is {WRONG_COLOR[thing]}."))
    for word, opp in OPPOSITES:
        rows.append((f"What is the opposite of {word}?", f"The opposite of {word} is {opp}.",
                     f"The opposite of {word} is {WRONG_OPP[word]}."))
    return rows


def write_jsonl(name: str, rows: list[dict]) -> None:
    with open(HERE / name, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    HERE.mkdir(exist_ok=True)
    pairs = qa_pairs()
    write_jsonl("alpaca.jsonl", [{"instruction": p, "input": "", "output": a} for p, a, _ in pairs])
    write_jsonl("messages.jsonl", [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
        for p, a, _ in pairs
    ])
    write_jsonl("sharegpt.jsonl", [
        {"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": a}]}
        for p, a, _ in pairs
    ])
    write_jsonl("preference.jsonl", [
        {"prompt": p, "chosen": a, "rejected": b} for p, a, b in pairs
    ])
    write_jsonl("kto.jsonl", [                      # unpaired feedback: each good and each bad answer, labelled
        {"prompt": p, "completion": answer, "label": label} for p, a, b in pairs for answer, label in
        ((a, True), (b, False))
    ])
    # plain text for continued pretraining: the facts as sentences, one document per line
    (HERE / "text.txt").write_text("".join(f"{a}\n" for _, a, _ in pairs), encoding="utf-8")


if __name__ == "__main__":
    main()
