"""The adversarial catalogue behind the README's "Reliability and security" counts: what a hostile or unlucky user
does to llfarm (strategy files, security, CLI edges, run faults), each case with what "held" means.

A refusal holds when it is exit 2, exactly one line on stderr starting with ``llfarm: error:``, no traceback, nothing
left under --output, and (where the case says so) the line names what it should. Run faults hold when the run ends in
the right status and resumes. A secret case holds when no file of the run directory holds the secret. Usage:

    python benchmarks/adversarial.py                      # every case, against the installed llfarm
    python benchmarks/adversarial.py --quick              # no training (the fast cases only)
    python benchmarks/adversarial.py --src /tmp/base      # another checkout's code (PYTHONPATH), e.g. the code before

It prints one line per case (HELD / FAILED and why) and the totals; benchmarks/RESULTS-reliability.md has the result
before and after the reliability work. The data-file cases of the issue belong to the data layer and are not here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECRET = "hf_adversarialTOKENabcdefghijklmnopqr"
GOOD = """\
name: t
model: {path: "builtin:tiny-llama"}
data: {train: "builtin:alpaca", max_length: 64}
training: {max_steps: 2, batch_size: 4}
"""
SHORT = ["--set", "training.save_every=2", "--set", "training.logging_steps=1", "--set", "export.formats=[]"]
ENV: dict[str, str] = {}


@dataclass
class Result:
    code: int
    out: str
    err: str
    tmp: Path


@dataclass
class Case:
    id: str
    group: str
    run: Callable[[Path], Result]
    check: Callable[[Result], str | None]   # None: held; else why not
    slow: bool = False


MEMORY_LIMIT = 6 * 2**30           # per llfarm process: a case that "grows memory without bound" stops here
FAST_TIMEOUT = 120                 # seconds, for a command that trains nothing


def _limit_memory() -> None:
    import resource
    resource.setrlimit(resource.RLIMIT_DATA, (MEMORY_LIMIT, MEMORY_LIMIT))


def llfarm(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: int = 900
           ) -> subprocess.CompletedProcess:
    full = dict(os.environ, HF_HUB_OFFLINE="1", **ENV, **(env or {}))
    return subprocess.run([sys.executable, "-m", "llfarm.cli", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=timeout, check=False, preexec_fn=_limit_memory)


def cli(*args: str, env: dict[str, str] | None = None) -> Callable[[Path], Result]:
    """A command with '{tmp}' in its arguments replaced by the case's folder; `run` gets -o {tmp}/runs."""
    def go(tmp: Path) -> Result:
        argv = [a.replace("{tmp}", str(tmp)) for a in args]
        if argv[0] == "run" and "-o" not in argv:
            argv += ["-o", str(tmp / "runs")]
        try:
            p = llfarm(*argv, cwd=tmp, env=env, timeout=FAST_TIMEOUT)
        except subprocess.TimeoutExpired:
            return Result(124, "", f"still running after {FAST_TIMEOUT} s (killed)", tmp)
        return Result(p.returncode, p.stdout, p.stderr, tmp)
    return go


def with_file(name: str, content: str | bytes, then: Callable[[Path], Result]) -> Callable[[Path], Result]:
    def go(tmp: Path) -> Result:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return then(tmp)
    return go


def strat(text: str | bytes, *args: str, command: str = "run", env: dict[str, str] | None = None):
    return with_file("s.yaml", text, cli(command, "{tmp}/s.yaml", *args, env=env))


def refused(*pieces: str, secret: str | None = None) -> Callable[[Result], str | None]:
    def check(r: Result) -> str | None:
        err = r.err.strip()
        if r.code != 2:
            return f"exit {r.code}: {err.splitlines()[-1] if err else r.out[-200:]}"
        if "Traceback" in r.err:
            return "traceback"
        if len(err.splitlines()) != 1 or not err.startswith("llfarm: error:"):
            return f"not one line: {err[:300]!r}"
        missing = [p for p in pieces if p not in err]
        if missing:
            return f"{missing} not in {err[:300]!r}"
        runs = r.tmp / "runs"
        if runs.exists() and any(runs.iterdir()):
            return f"left behind {[p.name for p in runs.iterdir()]}"
        if secret and secret in err:
            return "the error prints the secret"
        return None
    return check


def accepted(r: Result) -> str | None:
    return None if r.code == 0 else f"exit {r.code}: {r.err.strip()[-300:]}"


def usage_error(r: Result) -> str | None:
    """click's own usage errors (a missing argument, an unknown choice): exit 2, no traceback."""
    return None if r.code == 2 and "Traceback" not in r.err else f"exit {r.code}: {r.err[-300:]}"


def no_secret(r: Result) -> str | None:
    """No file llfarm wrote (a run directory, plan --out) holds the secret, nor does its output."""
    if r.code != 0:
        return f"exit {r.code}: {r.err.strip()[-300:]}"
    if SECRET in r.out or SECRET in r.err:
        return "printed"
    written = [p for d in ("runs", "planned") if (r.tmp / d).exists() for p in (r.tmp / d).rglob("*")]
    for path in written:
        if SECRET in path.name:
            return f"in a file name: {path}"
        if path.is_file() and not path.is_symlink() and SECRET.encode() in path.read_bytes():
            return f"in {path.relative_to(r.tmp)}"
    return None


def template(edit: Callable[[str], str]) -> str:
    return edit((REPO / "templates" / "chatml.yaml").read_text(encoding="utf-8"))


def model_dir(tmp: Path, drop=(), config: str | None = None, tokenizer: str | None = None) -> Path:
    from llfarm.resources import resolve_builtin_model
    dest = tmp / "m"
    shutil.copytree(resolve_builtin_model("builtin:tiny-llama"), dest)
    for f in drop:
        (dest / f).unlink()
    if config is not None:
        (dest / "config.json").write_text(config)
    if tokenizer is not None:
        (dest / "tokenizer.json").write_text(tokenizer)
    return dest


def with_model(text: str, **kw) -> Callable[[Path], Result]:
    def go(tmp: Path) -> Result:
        m = model_dir(tmp, **kw)
        return strat(text.replace('"builtin:tiny-llama"', str(m)))(tmp)
    return go


def bomb(levels: int = 9, where: str = "x") -> str:
    lines = ["x0: &x0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7}"]
    for i in range(1, levels):
        p = f"*x{i - 1}"
        lines.append(f"x{i}: &x{i} {{a: {p}, b: {p}, c: {p}, d: {p}, e: {p}, f: {p}, g: {p}}}")
    return GOOD + "\n".join(lines) + "\n"


def list_bomb() -> str:
    lines = ["backend_options:", "  pytorch:", "    x0: &x0 [a, b, c, d, e, f, g, h, i]"]
    for i in range(1, 9):
        p = f"*x{i - 1}"
        lines.append(f"    x{i}: &x{i} [{p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}]")
    return GOOD + "\n".join(lines) + "\n"


def timed(limit: float, inner: Callable[[Path], Result]) -> Callable[[Path], Result]:
    """``inner`` must finish within ``limit`` seconds (each llfarm process is killed after FAST_TIMEOUT anyway)."""
    def go(tmp: Path) -> Result:
        start = time.time()
        r = inner(tmp)
        if time.time() - start > limit:
            return Result(124, r.out, f"took {time.time() - start:.1f} s (limit {limit} s)", tmp)
        return r
    return go


def fast_cases() -> list[Case]:
    c: list[Case] = []

    def add(id_, group, run, check):
        c.append(Case(id_, group, run, check))

    s = "strategy"
    add("unknown top-level key", s, strat(GOOD + "modle: {path: x}\n"), refused("did you mean 'model'", "s.yaml:5"))
    add("unknown nested key", s, strat(GOOD.replace("max_steps: 2", "max_steps: 2, learnig_rate: 1")),
        refused("did you mean 'learning_rate'"))
    add("wrong type", s, strat(GOOD.replace("batch_size: 4", "batch_size: four")), refused("training.batch_size"))
    add("out of range", s, strat(GOOD.replace("max_steps: 2", "max_steps: 0")), refused("training.max_steps"))
    add("huge batch", s, strat(GOOD.replace("batch_size: 4", "batch_size: 1000000000")), refused("batch_size"))
    add("unknown stage", s, strat(GOOD + "stage: sfft\n"), refused("'stage'"))
    add("unknown method", s, strat(GOOD + "method: {type: adapter}\n"), refused("method.type"))
    add("malformed YAML", s, strat(GOOD + "training: [unclosed\n"), refused("malformed YAML"))
    add("YAML list, not mapping", s, strat("- a\n- b\n"), refused("expected a mapping"))
    add("empty file", s, strat(""), refused("'data' is required"))
    add("NUL byte", s, strat(GOOD.encode() + b"description: a\x00b\n"), refused())
    add("python object tag", s, strat(GOOD + "description: !!python/object/apply:os.system ['true']\n"),
        refused("s.yaml"))
    add("extends unknown", s, strat("extends: quikstart\n" + GOOD), refused("did you mean 'quickstart'"))
    add("extends cycle", s, with_file("b.yaml", "extends: s.yaml\n" + GOOD,
                                     strat("extends: b.yaml\n" + GOOD)), refused("cycle"))
    add("extends not a string", s, strat("extends: [a]\n" + GOOD), refused("extends"))
    add("non-UTF-8 strategy", s, strat(GOOD.encode() + b"description: caf\xe9\n"), refused("not UTF-8", "s.yaml:5"))
    add("BOM at start of strategy (accepted)", s, strat(b"\xef\xbb\xbf" + GOOD.encode(), command="validate"),
        accepted)
    add("alias bomb (mappings)", s, timed(10, strat(bomb())), refused("alias"))   # base: 18 GB in 6 min
    add("alias bomb (lists under backend_options)", s, timed(10, strat(list_bomb())), refused())
    add("alias bomb in a known key", s, timed(10, strat(bomb() + "description: *x8\n")), refused("alias"))
    add("recursive alias", s, timed(10, strat(GOOD + "description: &a [1, *a]\n")), refused())
    add("undefined alias", s, strat(GOOD + "description: *nope\n"), refused("malformed YAML"))
    add("duplicate top-level key", s, strat(GOOD + "training: {max_steps: 5}\n"),
        refused("duplicate key 'training' on lines 4 and 5"))
    add("duplicate nested key", s, strat(GOOD.replace("max_steps: 2,", "max_steps: 2, max_steps: 3,")),
        refused("duplicate key 'training.max_steps'"))
    add("deep nesting", s, timed(20, strat(GOOD + "description: " + "[" * 5000 + "]" * 5000 + "\n")), refused())
    add("10 MB description (accepted)", s, timed(60, strat(GOOD + "description: '" + "x" * 10_000_000 + "'\n",
                                                          command="validate")), accepted)
    t = "template"
    add("unknown template", t, strat(GOOD + "template: chatlm\n"), refused("did you mean 'chatml'"))
    add("template file missing", t, strat(GOOD + "template: nothere.yaml\n"), refused("nothere.yaml"))
    add("template YAML without jinja", t, with_file("t.yaml", "name: x\n", strat(GOOD + "template: t.yaml\n")),
        refused("needs the keys"))
    add("template YAML malformed", t, with_file("t.yaml", "name: [x\n", strat(GOOD + "template: t.yaml\n")),
        refused("t.yaml"))
    add("template broken jinja", t, with_file("t.yaml", template(lambda x: x.replace("{% for", "{% if %}{% for", 1)),
                                              strat(GOOD + "template: t.yaml\n")), refused("jinja syntax error"))
    add("template broken jinja (validate)", t,
        with_file("t.yaml", template(lambda x: x.replace("{% for", "{% if %}{% for", 1)),
                  strat(GOOD + "template: t.yaml\n", command="validate")), refused("jinja syntax error"))
    add("template that fails on the data", t,
        with_file("t.yaml", template(lambda x: x.replace("{% for message in messages %}",
                                                         "{% for message in messages %}{{ message.a.b }}", 1)),
                  strat(GOOD + "template: t.yaml\n")), refused("cannot render"))
    add("template raise_exception", t,
        with_file("t.yaml", template(lambda x: x.replace("{% for message in messages %}",
                                                         "{{ raise_exception('no') }}{% for message in messages %}", 1)),
                  strat(GOOD + "template: t.yaml\n")), refused("cannot render"))
    add("template prompt not a prefix", t,
        with_file("t.yaml", template(lambda x: x.replace("{% for message in messages %}",
                                                         "{{ messages|length }}{% for message in messages %}", 1)),
                  strat(GOOD + "template: t.yaml\n")), refused("not the start"))
    add("template non-UTF-8", t, with_file("t.yaml", template(lambda x: x).encode().replace(
        b"description:", b"description: \xff", 1), strat(GOOD + "template: t.yaml\n")), refused("not UTF-8"))
    add("template alias bomb", t, timed(10, with_file("t.yaml", bomb().replace(GOOD, "name: x\njinja: y\n"),
                                                      strat(GOOD + "template: t.yaml\n"))), refused())
    add("template jinja not a string", t, with_file("t.yaml", "name: x\njinja: [1, 2]\n",
                                                    strat(GOOD + "template: t.yaml\n")), refused())
    o = "backend_options"
    add("misspelt backend", o, strat(GOOD + "backend_options: {lamafactory: {}}\n"),
        refused("did you mean 'llamafactory'"))
    add("pytorch unknown option", o, strat(GOOD + "backend_options: {pytorch: {torch_compil: true}}\n"),
        refused("did you mean 'torch_compile'"))
    add("pytorch option out of range", o, strat(GOOD + "backend_options: {pytorch: {label_smoothing_factor: 2}}\n"),
        refused("label_smoothing_factor"))
    add("unknown optimizer", o, strat(GOOD.replace("max_steps: 2,", "max_steps: 2, optimizer: adamw_trch,")),
        refused("training.optimizer"))
    add("llamafactory unknown key", o,
        strat(GOOD + "backend: llamafactory\nbackend_options: {llamafactory: {learning_rat: 1}}\n"),
        refused("did you mean 'learning_rate'"))
    add("llamafactory owned key", o,
        strat(GOOD + "backend: llamafactory\nbackend_options: {llamafactory: {lora_rank: 4}}\n"), refused("method.r"))
    add("llamafactory wrong type", o,
        strat(GOOD + "backend: llamafactory\nbackend_options: {llamafactory: {ddp_timeout: eight}}\n"),
        refused("ddp_timeout"))
    add("llamafactory bad choice", o,
        strat(GOOD + "backend: llamafactory\nbackend_options: {llamafactory: {optim: bogus}}\n"), refused("optim"))
    add("backend_options not a mapping", o, strat(GOOD + "backend_options: [1]\n"), refused("backend_options"))
    add("empty pytorch options (accepted)", o, strat(GOOD + "backend_options: {pytorch: null}\n",
                                                     command="validate"), accepted)
    m = "model"
    add("model folder missing", m, strat(GOOD.replace('"builtin:tiny-llama"', "./nope")), refused("not found"))
    add("model folder without config.json", m, with_model(GOOD, drop=["config.json"]), refused("config.json"))
    add("model corrupt config.json", m, with_model(GOOD, config='{"model_type": '), refused("config.json"))
    add("model config.json not an object", m, with_model(GOOD, config="[]"), refused("config.json"))
    add("model without a tokenizer", m, with_model(GOOD, drop=["tokenizer.json", "tokenizer_config.json"]),
        refused("tokenizer"))
    add("model corrupt tokenizer.json", m, with_model(GOOD, tokenizer="{oops"), refused("tokenizer.json"))
    add("uncached hub id offline", m, strat(GOOD.replace('"builtin:tiny-llama"', "nobody/never-cached")),
        refused("cache"))
    add("malformed hub id", m, strat(GOOD.replace('"builtin:tiny-llama"', "a/b/c d")), refused("model.path"))
    e = "export/hardware"
    add("plain template with ollama export", e, strat(GOOD + "template: plain\nexport: {formats: [ollama]}\n"),
        refused("Ollama"))
    add("reward model with gguf export", e,
        strat(GOOD.replace("builtin:alpaca", "builtin:preference") + "stage: rm\nexport: {formats: [gguf]}\n"),
        refused("reward model"))
    add("system prompt with triple quotes + ollama", e,
        strat(GOOD.replace("max_length: 64", 'max_length: 64, system: "a \\"\\"\\" b"')
              + "export: {formats: [ollama]}\n"), refused('"""'))
    add("qlora without GPU", e, strat(GOOD + "method: {type: qlora}\n"), refused("CUDA"))
    add("8-bit without GPU", e, strat(GOOD.replace('tiny-llama"}', 'tiny-llama", quantization: 8bit}')),
        refused("CUDA"))
    add("unsloth without GPU", e, strat(GOOD + "backend: unsloth\n"), refused("GPU"))
    add("deepspeed JSON missing", e, strat(GOOD + "distributed: {deepspeed: nothere.json}\n"), refused("DeepSpeed"))
    p = "paths"
    add("name with ../ traversal", p, strat(GOOD.replace("name: t", "name: x/../../../y")), refused("'name'"))
    add("name absolute", p, strat(GOOD.replace("name: t", "name: /tmp/x")), refused("'name'"))
    add("name '..'", p, strat(GOOD.replace("name: t", "name: '..'")), refused("'name'"))
    add("name with newline", p, strat(GOOD.replace("name: t", 'name: "a\\nb"')), refused("'name'"))
    add("name 101 characters", p, strat(GOOD.replace("name: t", "name: " + "x" * 101)), refused("'name'"))
    add("name empty", p, strat(GOOD.replace("name: t", "name: ''")), refused("'name'"))
    add("--run-id ../../x", p, strat(GOOD, "--run-id", "../../escaped"), refused("--run-id"))
    add("--run-id absolute", p, strat(GOOD, "--run-id", "/tmp/llfarm-adversarial-abs"), refused("--run-id"))
    add("--run-id a/b", p, strat(GOOD, "--run-id", "a/b"), refused("--run-id"))
    add("--run-id ..", p, strat(GOOD, "--run-id", ".."), refused("--run-id"))
    add("--run-id .hidden", p, strat(GOOD, "--run-id", ".hidden"), refused("--run-id"))
    add("--output is a file", p, with_file("afile", "x", strat(GOOD, "-o", "{tmp}/afile/runs")), refused("afile"))
    sec = "secrets"
    add("token in data.system", sec, strat(GOOD, "--set", f"data.system=hello {SECRET}"),
        refused("data.system", secret=SECRET))
    add("token as export.name", sec, strat(GOOD, "--set", f"export.name={SECRET}"), refused(secret=SECRET))
    add("token as name", sec, strat(GOOD, "--set", f"name={SECRET}"), refused(secret=SECRET))
    add("token as --run-id", sec, strat(GOOD, "--run-id", SECRET), refused(secret=SECRET))
    add("$HF_TOKEN value in --set error", sec, strat(GOOD, "--set", "training.max_steps=sekrit-value-123",
                                                     env={"HF_TOKEN": "sekrit-value-123"}),
        refused(secret="sekrit-value-123"))
    add("llamafactory hf_hub_token in native files", sec,
        strat(GOOD + f"backend: llamafactory\nbackend_options: {{llamafactory: {{hf_hub_token: {SECRET}}}}}\n",
              "--out", "{tmp}/planned", command="plan"), no_secret)
    add("llamafactory swanlab_api_key in native files", sec,
        strat(GOOD + f"backend: llamafactory\nbackend_options: {{llamafactory: {{swanlab_api_key: {SECRET}}}}}\n",
              "--out", "{tmp}/planned", command="plan"), no_secret)
    add("hf_ token in description, plan --out", sec,
        strat(GOOD + f"description: mine is {SECRET}\n", "--out", "{tmp}/planned", command="plan"), no_secret)
    k = "cli"
    add("--set unknown key", k, strat(GOOD, "--set", "training.epochz=2"), refused("--set"))
    add("--set through a value", k, strat(GOOD, "--set", "training.max_steps.x=1"), refused("--set"))
    add("--set empty path part", k, strat(GOOD, "--set", "training..x=1"), refused("--set"))
    add("--set without =", k, strat(GOOD, "--set", "training.max_steps"), refused("--set"))
    add("--set section to scalar", k, strat(GOOD, "--set", "model=oops"), refused("--set model=oops"))
    add("--set unparsable value", k, strat(GOOD, "--set", "training.max_steps=["), refused("max_steps"))
    add("--backend unknown", k, strat(GOOD, "--backend", "pytorh"), refused("did you mean 'pytorch'"))
    add("strategy file not found", k, cli("run", "{tmp}/missing.yaml"), refused("not found"))
    add("strategy path is a folder", k, cli("run", "{tmp}"), refused())
    add("resume a folder that is not a run", k, cli("resume", "{tmp}"), refused("not a run directory"))
    add("generate a folder that is not a run", k, cli("generate", "{tmp}", "-p", "hi"), refused("not a run"))
    add("export a folder that is not a run", k, cli("export", "{tmp}", "--format", "gguf"), refused("not a run"))
    add("export unknown format (click)", k, cli("export", "{tmp}", "--format", "onnx"), usage_error)
    add("run without a strategy (click)", k, cli("run"), usage_error)
    add("plan | head -1", k, lambda tmp: _piped(tmp, "plan quickstart", "# strategy:"), accepted)
    add("strategies list with stdout closed", k, lambda tmp: _closed_stdout(tmp, ["strategies", "list"]), accepted)
    add("validate --explain | head -1", k, lambda tmp: _piped(tmp, "validate quickstart --explain", "name ="),
        accepted)
    return c


def _piped(tmp: Path, command: str, first: str) -> Result:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **ENV)
    p = subprocess.run(["bash", "-c", f"{shlex_join([sys.executable, '-m', 'llfarm.cli'])} {command} | head -1"],
                       cwd=tmp, env=env, capture_output=True, text=True, timeout=FAST_TIMEOUT, check=False,
                       preexec_fn=_limit_memory)
    ok = p.stdout.startswith(first) and p.stderr == ""
    return Result(0 if ok else 1, p.stdout, p.stderr, tmp)


def _closed_stdout(tmp: Path, args: list[str]) -> Result:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **ENV)
    p = subprocess.Popen([sys.executable, "-m", "llfarm.cli", *args], cwd=tmp, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, preexec_fn=_limit_memory)  # noqa: PLW1509
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    return Result(0 if err == "" else 1, "", err, tmp)


def shlex_join(parts: list[str]) -> str:
    import shlex
    return " ".join(shlex.quote(x) for x in parts)


# ---------------------------------------------------------------- run faults (train the tiny model)

def _start(tmp: Path, run_id: str, steps: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    full = dict(os.environ, HF_HUB_OFFLINE="1", **ENV, **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "llfarm.cli", "run", "quickstart", "-o", str(tmp / "runs"),
                             "--run-id", run_id, "--set", f"training.max_steps={steps}", *SHORT],
                            cwd=tmp, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_limit_memory)  # noqa: PLW1509 - single-threaded


def _wait(predicate, timeout: float = 600) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _has_checkpoint(run: Path, step: int) -> bool:
    ckpt = run / "checkpoints" / f"checkpoint-{step}"
    return (ckpt / "trainer_state.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except (ProcessLookupError, OSError):
        return False


def _trainer_pids(run: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", str(run / "native")], capture_output=True, text=True, check=False).stdout
    return [int(x) for x in out.split()]


def _status(run: Path) -> str:
    try:
        return json.loads((run / "manifest.json").read_text()).get("status", "")
    except (OSError, ValueError):
        return ""


def _kill_llfarm(tmp: Path, run_id: str) -> tuple[Path, bool, str]:
    """Start a long run, SIGKILL llfarm once checkpoint-2 exists; (run, whether its training processes died within
    20 s, why not). Whatever the code under test left running is killed afterwards."""
    run = tmp / "runs" / run_id
    proc = _start(tmp, run_id, 400)
    _wait(lambda: _has_checkpoint(run, 2))
    pids = _trainer_pids(run)
    proc.kill()
    proc.communicate()
    gone = _wait(lambda: not any(_alive(p) for p in pids), timeout=20)
    for p in pids:
        if _alive(p):
            os.kill(p, signal.SIGKILL)
    why = "no training process found" if not pids else "" if gone else "the training outlived llfarm by 20 s"
    return run, bool(pids) and gone, why


def _resume_ok(run: Path, tmp: Path, *args: str) -> Result:
    r = llfarm("resume", str(run), *args)
    ok = r.returncode == 0 and _status(run) == "completed"
    return Result(0 if ok else 1, r.stdout, r.stderr, tmp)


def kill9_llfarm(tmp: Path) -> Result:
    _, gone, why = _kill_llfarm(tmp, "k")
    return Result(0 if gone else 1, "", why, tmp)


def kill9_then_resume(tmp: Path) -> Result:
    run, _, _ = _kill_llfarm(tmp, "k")
    return _resume_ok(run, tmp, "--max-steps", "6")


def concurrent_resume(tmp: Path) -> Result:
    run = tmp / "runs" / "c"
    proc = _start(tmp, "c", 16)
    _wait(lambda: _has_checkpoint(run, 2))
    r = llfarm("resume", str(run))
    proc.communicate(timeout=900)
    why = []
    if r.returncode != 2:
        why.append(f"resume while training: exit {r.returncode}")
    if _status(run) != "completed":
        why.append(f"first run ends {_status(run)!r}")
    return Result(1 if why else 0, "", "; ".join(why), tmp)


def half_written_checkpoint(tmp: Path) -> Result:
    """A finished run whose newest checkpoint is cut short the way a kill mid-save leaves it (weights written,
    optimizer file truncated, no trainer state): resume must continue from the previous one."""
    run = tmp / "runs" / "h"
    proc = _start(tmp, "h", 6)
    proc.communicate(timeout=900)
    newest = run / "checkpoints" / "checkpoint-6"
    with open(newest / "optimizer.pt", "r+b") as fh:
        fh.truncate(64)
    (newest / "trainer_state.json").unlink()
    for marker in newest.glob("llfarm-complete.json"):
        marker.unlink()
    return _resume_ok(run, tmp, "--max-steps", "8")


def full_disk_names_file(tmp: Path) -> Result:
    run = tmp / "runs" / "f"
    proc = _start(tmp, "f", 8)
    _wait(lambda: _has_checkpoint(run, 2))
    (run / "checkpoints" / "checkpoint-6").mkdir()
    (run / "checkpoints" / "checkpoint-6" / "optimizer.pt").symlink_to("/dev/full")
    out, err = proc.communicate(timeout=900)
    named = "checkpoint-6/optimizer.pt" in err
    return Result(0 if proc.returncode == 1 and named else 1, out, err if not named else "", tmp)


def exit_code_after_resume(tmp: Path) -> Result:
    run = tmp / "runs" / "x"
    proc = _start(tmp, "x", 400)
    _wait(lambda: _has_checkpoint(run, 2))
    pids = _trainer_pids(run)
    os.kill(min(pids), signal.SIGKILL)
    proc.communicate(timeout=300)
    r = llfarm("resume", str(run), "--max-steps", "6")
    m = json.loads((run / "manifest.json").read_text())
    ok = r.returncode == 0 and m.get("status") == "completed" and m.get("exit_code") in (0, None)
    return Result(0 if ok else 1, "", f"exit_code {m.get('exit_code')!r} after a successful resume", tmp)


def max_steps_zero(tmp: Path) -> Result:
    run = tmp / "runs" / "z"
    proc = _start(tmp, "z", 2)
    proc.communicate(timeout=900)
    r = llfarm("resume", str(run), "--max-steps", "0")
    return Result(r.returncode, r.stdout, r.stderr, tmp / "none")


def secrets_in_run(tmp: Path) -> Result:
    (tmp / "s.yaml").write_text(GOOD + f"description: 'token {SECRET}'\nexport: {{formats: [ollama], quant: f16}}\n")
    r = llfarm("run", str(tmp / "s.yaml"), "-o", str(tmp / "runs"), env={"HF_TOKEN": SECRET})
    return Result(r.returncode, r.stdout, r.stderr, tmp)


def stderr_pipe_closed(tmp: Path) -> Result:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **ENV)
    cmd = f"{shlex_join([sys.executable, '-m', 'llfarm.cli'])} run quickstart -o runs --run-id p " \
          "--set training.max_steps=3 --set export.formats=[] 2>&1 | head -1"
    subprocess.run(["bash", "-c", cmd], cwd=tmp, env=env, capture_output=True, text=True, timeout=900, check=False,
                   preexec_fn=_limit_memory)
    status = _status(tmp / "runs" / "p")
    return Result(0 if status == "completed" else 1, "", f"status {status!r}", tmp)


def sigterm(tmp: Path) -> Result:
    run = tmp / "runs" / "t"
    proc = _start(tmp, "t", 400)
    _wait(lambda: _has_checkpoint(run, 2))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    ok = proc.returncode == 143 and _status(run) == "interrupted" and "llfarm resume" in err
    return Result(0 if ok else 1, out, err[-300:], tmp)


def slow_cases() -> list[Case]:
    f = "run faults"
    return [
        Case("kill -9 llfarm: training process dies too", f, kill9_llfarm, accepted, slow=True),
        Case("kill -9 llfarm, then resume", f, kill9_then_resume, accepted, slow=True),
        Case("resume while the run is training", f, concurrent_resume, accepted, slow=True),
        Case("half-written newest checkpoint, then resume", f, half_written_checkpoint, accepted, slow=True),
        Case("full disk during a save names the file", f, full_disk_names_file, accepted, slow=True),
        Case("exit_code after a successful resume", f, exit_code_after_resume, accepted, slow=True),
        Case("resume --max-steps 0", f, max_steps_zero, refused("--max-steps"), slow=True),
        Case("SIGTERM of llfarm", f, sigterm, accepted, slow=True),
        Case("run 2>&1 | head -1 still completes", f, stderr_pipe_closed, accepted, slow=True),
        Case("$HF_TOKEN and hf_ token in a real run + export", "secrets", secrets_in_run, no_secret, slow=True),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the cases that train")
    ap.add_argument("--src", type=Path, help="a checkout whose llfarm/ to test instead (PYTHONPATH)")
    ap.add_argument("-k", help="only cases whose id contains this")
    args = ap.parse_args()
    if args.src:
        ENV["PYTHONPATH"] = str(args.src.resolve())
    cases = fast_cases() + ([] if args.quick else slow_cases())
    if args.k:
        cases = [c for c in cases if args.k in c.id]
    held = 0
    by_group: dict[str, list[int]] = {}
    for case in cases:
        with tempfile.TemporaryDirectory(prefix="llfarm-adv-") as tmp:
            try:
                why = case.check(case.run(Path(tmp)))
            except Exception as exc:  # noqa: BLE001 - a case that breaks the harness did not hold
                why = f"harness: {type(exc).__name__}: {exc}"
        held += why is None
        g = by_group.setdefault(case.group, [0, 0])
        g[0] += why is None
        g[1] += 1
        print(f"{'HELD  ' if why is None else 'FAILED'} [{case.group}] {case.id}" + (f" — {why}" if why else ""),
              flush=True)
    print()
    for group, (ok, n) in by_group.items():
        print(f"{group:<16} {ok}/{n}")
    print(f"{'total':<16} {held}/{len(cases)} held")
    for leftover in Path("/tmp").glob("llfarm-adversarial-abs*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
