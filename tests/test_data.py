"""Data formats read everywhere: detection, normalization, line-numbered errors."""

from __future__ import annotations

import json

import pytest
from conftest import write

from llfarm.data import load, prepare
from llfarm.errors import DataError
from llfarm.strategy import resolve


def jsonl(tmp_path, rows, name="d.jsonl"):
    return str(write(tmp_path / name, "".join(json.dumps(r) + "\n" for r in rows)))


def test_alpaca_with_input_and_system(tmp_path):
    p = jsonl(tmp_path, [{"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief."}])
    fmt, rows, _ = load(p, "data.train", stage="sft")
    assert fmt == "alpaca"
    assert rows[0]["messages"] == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Add\n2 and 3"},
                                   {"role": "assistant", "content": "5"}]


def test_messages_and_sharegpt_agree(tmp_path):
    m = jsonl(tmp_path, [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
              "m.jsonl")
    s = jsonl(tmp_path, [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}],
              "s.jsonl")
    (fm, rows_m, _), (fs, rows_s, _) = load(m, "k", stage="sft"), load(s, "k", stage="sft")
    assert (fm, fs) == ("messages", "sharegpt")
    assert rows_m == rows_s


def test_json_array_is_read(tmp_path):
    p = write(tmp_path / "d.json", json.dumps([{"instruction": "a", "output": "b"}] * 3))
    fmt, rows, _ = load(str(p), "k", stage="sft")
    assert (fmt, len(rows)) == ("alpaca", 3)


@pytest.mark.parametrize("row", [
    {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
    {"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": "good"}],
     "rejected": [{"role": "assistant", "content": "bad"}]},
    {"instruction": "Q?", "input": "", "chosen": "good", "rejected": "bad"},
])
def test_preference_forms_normalize_the_same(tmp_path, row):
    fmt, rows, _ = load(jsonl(tmp_path, [row]), "k", stage="dpo")
    assert fmt == "preference"
    assert rows[0] == {"prompt": [{"role": "user", "content": "Q?"}], "chosen": "good", "rejected": "bad"}


def test_default_system_prompt_is_added(tmp_path):
    p = jsonl(tmp_path, [{"instruction": "a", "output": "b"}])
    _, rows, _ = load(p, "k", stage="sft", system="SYS")
    assert rows[0]["messages"][0] == {"role": "system", "content": "SYS"}


def test_mixed_formats_name_the_line(tmp_path):
    p = jsonl(tmp_path, [{"instruction": "a", "output": "b"}, {"conversations": []}])
    with pytest.raises(DataError) as e:
        load(p, "k", stage="sft")
    assert e.value.where.endswith("d.jsonl:2")


def test_conversation_must_end_with_assistant(tmp_path):
    p = jsonl(tmp_path, [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="end with an assistant"):
        load(p, "k", stage="sft")


def test_unknown_role_is_named(tmp_path):
    p = jsonl(tmp_path, [{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}])
    with pytest.raises(DataError, match="'robot'"):
        load(p, "k", stage="sft")


def test_eval_split_is_deterministic_and_disjoint():
    s = resolve("quickstart", ["data.eval_split=0.25"]).strategy
    a, b = prepare(s), prepare(s)
    assert (a.n_train, a.n_eval) == (24, 8)
    assert a.eval_rows == b.eval_rows
    assert not [r for r in a.eval_rows if r in a.train_rows]
