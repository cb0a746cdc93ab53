"""`llfarm data inspect|split|convert` the way the README shows them (a fresh folder, relative paths), their
one-line errors, JSON strategies, and runs that reuse the data and token caches instead of copying data."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import LLFARM, llfarm, manifest, run_dir_from, write

from llfarm.resources import BUILTIN_DATA

ALPACA = BUILTIN_DATA["alpaca"].read_text(encoding="utf-8")


def one_line(proc, *pieces):
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr, proc.stdout)
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("llfarm: error:"), err
    for p in pieces:
        assert p in err, (p, err)
    return err


def test_inspect_a_strategy_and_a_file(tmp_path):
    proc = llfarm("data", "inspect", "quickstart", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["records"] == 32 and rep["formats"] == ["alpaca"] and rep["roles"] == {"user": 32, "assistant": 32}
    tok = rep["tokens"]
    assert tok["examples"] == 32 and not tok["sampled"] and tok["max_length"] == 64
    assert tok["truncated"] == 0 and tok["no_trained_token"] == 0 and 8 < tok["p50"] <= 64
    # a file with duplicates, an empty answer, a system message; its own max_length truncates
    rows = [{"instruction": "a", "output": "b"}] * 3 + [{"instruction": "c", "output": " ", "system": "S"}]
    write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    proc = llfarm("data", "inspect", "d.jsonl", "--json", "--model", "builtin:tiny-llama", "--max-length", "8",
                  "--sample", "2", cwd=tmp_path)
    rep = json.loads(proc.stdout)
    assert (rep["records"], rep["duplicates"], rep["empty_answers"], rep["with_system"]) == (4, 2, 1, 1)
    assert rep["tokens"]["examples"] == 2 and rep["tokens"]["sampled"] and rep["tokens"]["truncated"] == 2
    people = llfarm("data", "inspect", "quickstart", cwd=tmp_path)
    assert people.returncode == 0 and "duplicates" in people.stdout and "max_length" in people.stdout


def test_split_is_deterministic_and_disjoint(tmp_path):
    write(tmp_path / "d.jsonl", ALPACA)
    proc = llfarm("data", "split", "d.jsonl", "--eval-percentage", "25", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    train, evals = (tmp_path / "d.train.jsonl").read_text(), (tmp_path / "d.eval.jsonl").read_text()
    assert (len(train.splitlines()), len(evals.splitlines())) == (24, 8)
    assert sorted(train.splitlines() + evals.splitlines()) == sorted(ALPACA.splitlines())
    again = llfarm("data", "split", "d.jsonl", "--eval-percentage", "25", "--train-output", "t.jsonl",
                   "--eval-output", "e.jsonl", cwd=tmp_path)
    assert again.returncode == 0 and (tmp_path / "e.jsonl").read_text() == evals
    # the same records a strategy's data.eval_split holds out
    from llfarm.data import prepare
    from llfarm.strategy import resolve
    held = prepare(resolve("quickstart", [f"data.train={tmp_path / 'd.jsonl'}", "data.eval_split=0.25"]).strategy,
                   write=True)
    assert [r["messages"][0]["content"] for r in held.rows("eval")] == \
        [json.loads(x)["instruction"] for x in evals.splitlines()]


def test_split_keeps_csv_a_csv(tmp_path):
    write(tmp_path / "d.csv", "question,answer\n" + "".join(f"q{i},a{i}\n" for i in range(10)))
    proc = llfarm("data", "split", "d.csv", "--eval-percentage", "20", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "d.train.csv").read_text().splitlines()[0] == "question,answer"
    assert len((tmp_path / "d.eval.csv").read_text().splitlines()) == 3


def test_convert_round_trip(tmp_path):
    write(tmp_path / "d.jsonl", ALPACA)
    assert llfarm("data", "convert", "d.jsonl", "--to", "sharegpt", cwd=tmp_path).returncode == 0
    first = json.loads((tmp_path / "d.sharegpt.jsonl").read_text().splitlines()[0])
    assert first["conversations"][0]["from"] == "human" and first["conversations"][1]["from"] == "gpt"
    back = llfarm("data", "convert", "d.sharegpt.jsonl", "--to", "alpaca", "--output", "back.jsonl", cwd=tmp_path)
    assert back.returncode == 0, back.stderr
    orig = [json.loads(x) for x in ALPACA.splitlines()]
    got = [json.loads(x) for x in (tmp_path / "back.jsonl").read_text().splitlines()]
    assert [(g["instruction"], g["output"]) for g in got] == [(o["instruction"], o["output"]) for o in orig]
    pref = llfarm("data", "convert", str(BUILTIN_DATA["preference"]), "--to", "preference", "--output", "p.jsonl",
                  cwd=tmp_path)
    assert pref.returncode == 0 and set(json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])) == \
        {"prompt", "chosen", "rejected"}


@pytest.mark.parametrize("args,pieces", [
    (["split", "d.jsonl", "--eval-percentage", "0"], ["--eval-percentage", "between 0 and 100"]),
    (["split", "d.jsonl", "--eval-percentage", "100"], ["between 0 and 100"]),
    (["split", "d.jsonl", "--eval-percentage", "ten"], ["'ten' is not a valid float"]),
    (["split", "nothere.jsonl", "--eval-percentage", "10"], ["file not found: nothere.jsonl"]),
    (["convert", "d.jsonl", "--to", "sharegtp"], ["did you mean 'sharegpt'"]),
    (["convert", "d.jsonl", "--to", "preference"], ["alpaca records cannot become preference records"]),
    (["convert", "multi.jsonl", "--to", "alpaca"], ["multi.jsonl:1", "several turns has no alpaca form"]),
    (["inspect", "bad.jsonl"], ["bad.jsonl:2", "malformed JSON line"]),
    (["inspect", "d.jsonl", "--format", "alpacca"], ["did you mean 'alpaca'"]),
])
def test_data_command_bad_input(tmp_path, args, pieces):
    write(tmp_path / "d.jsonl", ALPACA)
    write(tmp_path / "bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n')
    write(tmp_path / "multi.jsonl", json.dumps({"messages": [{"role": "user", "content": "a"},
                                                            {"role": "assistant", "content": "b"},
                                                            {"role": "user", "content": "c"},
                                                            {"role": "assistant", "content": "d"}]}) + "\n")
    before = set(tmp_path.iterdir())
    one_line(llfarm("data", *args, cwd=tmp_path), *pieces)
    assert set(tmp_path.iterdir()) == before, "nothing is written on bad input"


def test_split_refuses_to_overwrite_unless_forced(tmp_path):
    write(tmp_path / "d.jsonl", ALPACA)
    write(tmp_path / "d.train.jsonl", "mine\n")
    one_line(llfarm("data", "split", "d.jsonl", "--eval-percentage", "10", cwd=tmp_path), "the output exists",
             "--force")
    assert (tmp_path / "d.train.jsonl").read_text() == "mine\n"
    assert llfarm("data", "split", "d.jsonl", "--eval-percentage", "10", "--force", cwd=tmp_path).returncode == 0


def test_a_strategy_may_be_json(tmp_path):
    write(tmp_path / "s.json", json.dumps({"name": "j", "data": {"train": "d.jsonl"},
                                           "training": {"max_steps": 2}}, indent=2))
    write(tmp_path / "d.jsonl", ALPACA)
    proc = llfarm("validate", "s.json", cwd=tmp_path)
    assert proc.returncode == 0 and "32 training examples" in proc.stdout, proc.stderr
    write(tmp_path / "t.json", '{\n  "name": "j",\n  "data": {"train": "d.jsonl"},\n  "trainin": {}\n}\n')
    one_line(llfarm("validate", "t.json", cwd=tmp_path), "t.json:4", "did you mean 'training'")


# ---------------------------------------------------------------- runs reuse the caches

@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pytorch", "llamafactory"])
def test_runs_share_the_data_and_token_caches_and_copy_nothing(tmp_path, backend):
    cache = tmp_path / "cache"                      # this test's own cache: other tests (other workers) write theirs
    env = {"LLFARM_CACHE": str(cache)}
    write(tmp_path / "d.jsonl", "".join(ALPACA.splitlines(keepends=True)[:24]))
    sets = ["--set", "data.train=d.jsonl", "--set", "training.max_steps=3", "--set", "export.formats=[]"]
    first = run_dir_from(llfarm("run", "quickstart", "--backend", backend, "--run-id", "a", *sets, cwd=tmp_path,
                                env=env))
    files_after_first = {p for p in cache.rglob("*") if p.is_file()}
    assert [p for p in files_after_first if "/tokens/" in str(p)], "the first run made no token cache"
    second = run_dir_from(llfarm("run", "quickstart", "--backend", backend, "--run-id", "b", *sets, cwd=tmp_path,
                                 env=env))
    for run in (first, second):
        run = tmp_path / run
        assert not (run / "native" / "data").exists(), "the run copies no data"
        assert manifest(run)["data"]["train"].startswith(str(cache))
    new = {p for p in cache.rglob("*") if p.is_file()} - files_after_first
    assert not [p for p in new if "/data/" in str(p) or "/tokens/" in str(p)], \
        f"the second run wrote data or tokens again: {sorted(map(str, new))[:5]}"
    log = (tmp_path / second / "logs" / "train.log").read_text()
    assert ("from the token cache" in log) if backend == "pytorch" else ("Loaded tokenized dataset" in log)
    assert manifest(tmp_path / first)["final_metrics"]["final_loss"] == \
        manifest(tmp_path / second)["final_metrics"]["final_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pytorch", "llamafactory"])
def test_two_runs_at_once_on_the_same_new_data_tokenize_it_once(tmp_path, backend):
    """Two runs started together on the same data and an empty cache: both train to the same loss, and the token
    cache is written once (LlamaFactory's tokenized_path is held by the run that writes it; the other waits, then
    loads it) — never half-read or removed under the writer."""
    cache = tmp_path / "cache"
    write(tmp_path / "d.jsonl", "".join(ALPACA.splitlines(keepends=True)[:24]))
    env = dict(os.environ, LLFARM_CACHE=str(cache))
    procs = [subprocess.Popen([LLFARM, "run", "quickstart", "--backend", backend, "--run-id", rid, "--set",
                               "data.train=d.jsonl", "--set", "training.max_steps=3", "--set", "export.formats=[]"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rid in ("a", "b")]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    runs = [tmp_path / "runs" / rid for rid in ("a", "b")]
    assert len({manifest(r)["final_metrics"]["final_loss"] for r in runs}) == 1
    if backend == "llamafactory":
        logs = [(r / "logs" / "train.log").read_text() for r in runs]
        assert sorted("Loaded tokenized dataset" in log for log in logs) == [False, True], \
            "one run tokenizes and saves, the other loads what it saved"


def _bad_sources(tmp_path):
    import gzip as gz

    import pyarrow as pa
    import pyarrow.parquet as pq
    write(tmp_path / "q.csv", "q,a\nx,y\n")
    write(tmp_path / "empty.jsonl", "\n")
    write(tmp_path / "notgz.jsonl.gz", "plain text\n")
    pq.write_table(pa.table({"prompt_text": ["a"], "reply": ["b"]}), tmp_path / "schema.parquet")
    with gz.open(tmp_path / "ok.jsonl.gz", "wt") as fh:
        fh.write(ALPACA)


@pytest.mark.parametrize("sets,pieces", [
    (["data.train=q.csv", "data.columns={instruction: question, output: a}"],
     ["data.columns maps 'instruction' to column 'question'", "q.csv"]),
    (["data.train=[{path: d.jsonl, weight: 0}]"], ["'data.train", "greater than 0"]),
    (["data.train=empty.jsonl"], ["empty.jsonl", "the dataset is empty"]),
    (["data.train=[d.jsonl, builtin:preference]"], ["data.train[1]", "preference pairs"]),
    (["data.train=schema.parquet"], ["schema.parquet[row 1]", "cannot tell the format", "data.columns"]),
    (["data.train=notgz.jsonl.gz"], ["notgz.jsonl.gz", "cannot read it as gzip"]),
])
def test_bad_data_is_one_line_before_anything_is_written(tmp_path, sets, pieces):
    _bad_sources(tmp_path)
    write(tmp_path / "d.jsonl", ALPACA)
    args = ["run", "quickstart", "-o", "runs"]
    for s in sets:
        args += ["--set", s]
    one_line(llfarm(*args, cwd=tmp_path), *pieces)
    assert not (tmp_path / "runs").exists()


def test_a_gzipped_source_validates(tmp_path):
    _bad_sources(tmp_path)
    proc = llfarm("validate", "quickstart", "--set", "data.train=ok.jsonl.gz", cwd=tmp_path)
    assert proc.returncode == 0 and "32 training examples" in proc.stdout, proc.stderr
