"""Data read everywhere: every format, streaming, line-numbered errors, mixing, the eval split, the max_steps subset,
and the normalized-source cache (a second run reads nothing again, and copies nothing)."""

from __future__ import annotations

import gzip
import json

import pytest
from conftest import write

from llfarm.data import prepare
from llfarm.data.readers import Reader
from llfarm.errors import DataError, StrategyError
from llfarm.strategy import resolve


def jsonl(tmp_path, rows, name="d.jsonl"):
    return str(write(tmp_path / name, "".join(json.dumps(r) + "\n" for r in rows)))


def load(train, *sets, stage="sft"):
    """(source format, normalized rows) of a strategy's training data."""
    data = prepare(resolve("quickstart", [f"stage={stage}", f"data.train={train}", *sets]).strategy, write=True)
    return data.source_format, list(data.rows())


def problem(train, *sets, stage="sft") -> DataError:
    with pytest.raises(DataError) as e:
        load(train, *sets, stage=stage)
    return e.value


# ---------------------------------------------------------------- formats

def test_alpaca_with_input_and_system(tmp_path):
    fmt, rows = load(jsonl(tmp_path, [{"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be."}]))
    assert fmt == "alpaca"
    assert rows[0]["messages"] == [{"role": "system", "content": "Be."}, {"role": "user", "content": "Add\n2 and 3"},
                                   {"role": "assistant", "content": "5"}]


def test_messages_and_sharegpt_agree(tmp_path):
    m = jsonl(tmp_path, [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
              "m.jsonl")
    s = jsonl(tmp_path, [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}],
              "s.jsonl")
    (fm, rows_m), (fs, rows_s) = load(m), load(s)
    assert (fm, fs) == ("messages", "sharegpt") and rows_m == rows_s


def test_json_array_is_streamed_across_chunks(tmp_path):
    """A JSON array bigger than the reader's 1 MiB chunks, with multi-byte text, reads record by record."""
    rows = [{"instruction": f"é{i} " + "ß" * 300, "output": "ok"} for i in range(4000)]
    p = write(tmp_path / "d.json", "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]")
    assert p.stat().st_size > 2 << 20
    fmt, got = load(str(p))
    assert fmt == "alpaca" and len(got) == 4000 and got[3999]["messages"][0]["content"].startswith("é3999")


@pytest.mark.parametrize("row", [
    {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
    {"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": "good"}],
     "rejected": [{"role": "assistant", "content": "bad"}]},
    {"instruction": "Q?", "input": "", "chosen": "good", "rejected": "bad"},
])
def test_preference_forms_normalize_the_same(tmp_path, row):
    fmt, rows = load(jsonl(tmp_path, [row]), stage="dpo")
    assert fmt == "preference"
    assert rows[0] == {"prompt": [{"role": "user", "content": "Q?"}], "chosen": "good", "rejected": "bad"}


def test_default_system_prompt_is_added(tmp_path):
    _, rows = load(jsonl(tmp_path, [{"instruction": "a", "output": "b"}]), "data.system=SYS")
    assert rows[0]["messages"][0] == {"role": "system", "content": "SYS"}


def test_csv_and_tsv_with_column_mapping(tmp_path):
    write(tmp_path / "d.csv", 'question,answer\n"What, exactly?",Yes\nWhy,Because\n')
    write(tmp_path / "d.tsv", "question\tanswer\nWhat, exactly?\tYes\nWhy\tBecause\n")
    cols = "data.columns={instruction: question, output: answer}"
    a, b = load(str(tmp_path / "d.csv"), cols), load(str(tmp_path / "d.tsv"), cols)
    assert a == b and a[1][0]["messages"] == [{"role": "user", "content": "What, exactly?"},
                                              {"role": "assistant", "content": "Yes"}]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"instruction": ["a", "b"], "output": ["x", "y"]}), tmp_path / "d.parquet")
    fmt, rows = load(str(tmp_path / "d.parquet"))
    assert fmt == "alpaca" and [r["messages"][1]["content"] for r in rows] == ["x", "y"]
    pq.write_table(pa.table({"q": ["a"], "a": ["x"]}), tmp_path / "bad.parquet")
    e = problem(str(tmp_path / "bad.parquet"), "data.columns={instruction: question, output: a}")
    assert "'question'" in e.message and "columns: q, a" in e.message


def test_jsonl_gz_and_a_bad_gzip(tmp_path):
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write('{"instruction": "a", "output": "b"}\n' * 3)
    assert len(load(str(tmp_path / "d.jsonl.gz"))[1]) == 3
    write(tmp_path / "bad.jsonl.gz", "not gzip at all\n")
    assert "cannot read it as gzip" in problem(str(tmp_path / "bad.jsonl.gz")).message


def test_plain_text_per_line_and_per_file(tmp_path):
    write(tmp_path / "t" / "a.txt", "first line\n\nsecond line\n")
    write(tmp_path / "t" / "b.txt", "third\n")
    rows = [r for _, r in Reader("t", "k", "textdir", tmp_path / "t").records()]
    assert [r["text"] for r in rows] == ["first line", "second line", "third"]
    whole = [r for _, r in Reader("t", "k", "textdir", tmp_path / "t", text_unit="file").records()]
    assert [r["text"] for r in whole] == ["first line\n\nsecond line\n", "third\n"]
    e = problem(str(tmp_path / "t" / "a.txt"))
    assert "stage 'sft' needs instruction or conversation data" in e.message and "continued pretraining" in e.hint


def test_saved_datasets_folder_and_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict
    ds = Dataset.from_list([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}])
    ds.save_to_disk(str(tmp_path / "one"))
    DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert len(load(str(tmp_path / "one"))[1]) == 2
    assert len(load(str(tmp_path / "dict"))[1]) == 2
    e = problem(f"[{{path: {tmp_path / 'dict'}, split: validation}}]")
    assert "no split 'validation'" in e.message and "train, test" in e.message


def test_hub_dataset_offline_names_hf_hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    e = problem("hf:llfarm-no-such-org/no-such-dataset")
    assert "HF_HUB_OFFLINE=1" in e.message and "hf:llfarm-no-such-org/no-such-dataset" in e.message


# ---------------------------------------------------------------- errors name the record

def test_a_record_in_another_format_names_both_lines(tmp_path):
    e = problem(jsonl(tmp_path, [{"instruction": "a", "output": "b"}, {"conversations": []}]))
    assert e.where.endswith("d.jsonl:2") and "sharegpt" in e.message and "d.jsonl:1" in e.message


def test_a_record_missing_a_field_says_which(tmp_path):
    e = problem(jsonl(tmp_path, [{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    assert e.where.endswith("d.jsonl:2") and e.message == "alpaca record is missing 'output'"


def test_conversation_must_end_with_assistant(tmp_path):
    assert "end with an assistant" in problem(jsonl(tmp_path, [{"messages": [{"role": "user", "content": "hi"}]}])
                                              ).message


def test_unknown_role_is_named(tmp_path):
    rows = [{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}]
    assert "'robot'" in problem(jsonl(tmp_path, rows)).message


def test_a_bom_is_accepted_and_bad_text_is_refused_with_its_line(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"instruction": "a", "output": "b"}\n')
    assert len(load(str(tmp_path / "bom.jsonl"))[1]) == 1
    (tmp_path / "sur.jsonl").write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\\ud800", '
                                         b'"output": "b"}\n')
    e = problem(str(tmp_path / "sur.jsonl"))
    assert e.where.endswith("sur.jsonl:2") and "UTF-8" in e.message
    (tmp_path / "latin.jsonl").write_bytes('{"instruction": "caf\xe9", "output": "b"}\n'.encode("latin-1"))
    assert "UTF-8" in problem(str(tmp_path / "latin.jsonl")).message


def test_csv_column_named_by_data_columns_must_exist(tmp_path):
    write(tmp_path / "d.csv", "q,a\nx,y\n")
    e = problem(str(tmp_path / "d.csv"), "data.columns={instruction: question, output: a}")
    assert "data.columns maps 'instruction' to column 'question'" in e.message and "q, a" in e.message


def test_empty_source_and_unknown_extension(tmp_path):
    assert "empty" in problem(str(write(tmp_path / "e.jsonl", "\n\n"))).message
    assert "from its extension" in problem(str(write(tmp_path / "d.xlsx", "x"))).message


# ---------------------------------------------------------------- mixing, split, subset

def test_mixing_with_weights_is_seeded_and_recorded(tmp_path):
    a = jsonl(tmp_path, [{"instruction": f"a{i}", "output": "x"} for i in range(10)], "a.jsonl")
    b = jsonl(tmp_path, [{"messages": [{"role": "user", "content": f"b{i}"}, {"role": "assistant", "content": "y"}]}
                         for i in range(10)], "b.jsonl")
    mix = f"data.train=[{{path: {a}, weight: 2.0}}, {{path: {b}, weight: 0.5}}]"
    s = resolve("quickstart", [mix]).strategy
    d1, d2 = prepare(s, write=True), prepare(s, write=True)
    rows = [r["messages"][0]["content"] for r in d1.rows()]
    assert len(rows) == 25 and sum(r.startswith("a") for r in rows) == 20
    assert rows == [r["messages"][0]["content"] for r in d2.rows()]          # the same seed, the same mix
    other = prepare(resolve("quickstart", [mix, "training.seed=7"]).strategy, write=True)
    assert {r["messages"][0]["content"] for r in other.rows()} != set(rows)
    m = d1.manifest()
    assert [(x["count"], x["weight"], x["format"]) for x in m["sources"]] == [(10, 2.0, "alpaca"),
                                                                             (10, 0.5, "messages")]
    assert len(m["sha256"]) == 2


@pytest.mark.parametrize("weight,expect", [("0", "greater than 0"), ("-1", "greater than 0")])
def test_a_weight_must_be_positive(tmp_path, weight, expect):
    with pytest.raises(StrategyError, match=expect):
        resolve("quickstart", [f"data.train=[{{path: builtin:alpaca, weight: {weight}}}]"])


def test_sources_of_different_kinds_cannot_mix():
    e = problem("[builtin:alpaca, builtin:preference]")
    assert "preference pairs" in e.message and e.where == "data.train[1]"


def test_eval_split_is_deterministic_and_disjoint():
    s = resolve("quickstart", ["data.eval_split=0.25"]).strategy
    a, b = prepare(s, write=True), prepare(s, write=True)
    assert (a.n_train, a.n_eval) == (24, 8)
    assert list(a.rows("eval")) == list(b.rows("eval"))
    assert not [r for r in a.rows("eval") if r in list(a.rows("train"))]


def test_a_max_steps_run_gets_a_seeded_subset_of_what_it_sees():
    s = resolve("quickstart", ["training.max_steps=2", "training.batch_size=4"]).strategy
    d = prepare(s, write=True)
    assert (d.n_train, d.n_available) == (8, 32)
    assert list(d.rows()) == list(prepare(s, write=True).rows())
    whole = prepare(resolve("quickstart", ["training.max_steps=8", "training.batch_size=4"]).strategy, write=True)
    assert whole.n_train == 32, "a run that sees every example trains on all of them"


# ---------------------------------------------------------------- the cache

def test_a_second_prepare_reads_the_source_no_more(tmp_path, monkeypatch):
    path = jsonl(tmp_path, [{"instruction": "a", "output": "b"}] * 5)
    first = load(path)
    monkeypatch.setattr(Reader, "records", lambda self: (_ for _ in ()).throw(AssertionError("read again")))
    assert load(path) == first
    write(tmp_path / "d.jsonl", '{"instruction": "changed", "output": "b"}\n')      # new content, new entry
    monkeypatch.undo()
    assert load(path)[1][0]["messages"][0]["content"] == "changed"


def test_validate_reads_only(tmp_path):
    from llfarm.data import cache_root
    path = jsonl(tmp_path, [{"instruction": "read only", "output": "b"}])
    before = set(cache_root().rglob("*"))
    prepare(resolve("quickstart", [f"data.train={path}"]).strategy, write=False)
    assert set(cache_root().rglob("*")) == before


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "user", "content": "Q?"}], "chosen": {"role": "assistant", "content": "good"},
     "rejected": {"role": "assistant", "content": "bad"}},
    {"conversations": [{"from": "human", "value": "Q?"}], "chosen": {"from": "gpt", "value": "good"},
     "rejected": {"from": "gpt", "value": "bad"}},
])
def test_ranking_form_preference_pairs(tmp_path, row):
    """LlamaFactory's / ShareGPT's ranking form reads as the same pair."""
    fmt, rows = load(jsonl(tmp_path, [row]), stage="dpo")
    assert rows[0] == {"prompt": [{"role": "user", "content": "Q?"}], "chosen": "good", "rejected": "bad"}
