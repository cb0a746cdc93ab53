"""Load, resolve and validate strategies.

resolve = read YAML (safe_load; line numbers from the composed node tree) → follow ``extends:`` →
apply ``--set key.path=value`` → validate with the schema. Every problem of a file is reported at once,
each naming the key path and line. Every resolved value remembers where it came from.
"""

from __future__ import annotations

import copy
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import StrategyError, did_you_mean, one_of
from .redact import redact
from .resources import strategies_dir
from .schema import Strategy

PATH_KEYS = ("data.train", "data.eval", "distributed.deepspeed", "template", "model.path", "preference.reward_model",
             "preference.rewards")


@dataclass
class Resolved:
    strategy: Strategy
    file: Path | None
    sources: dict[str, str] = field(default_factory=dict)

    def source_of(self, key: str) -> str:
        return _origin(key, self.sources) or "default"


# ---------------------------------------------------------------- locating files

def shipped_strategies() -> dict[str, Path]:
    return {p.stem: p for p in sorted(strategies_dir().glob("*.yaml"))}


def find_strategy(ref: str, *, relative_to: Path | None = None) -> Path:
    """A strategy by path, or by shipped name (``quickstart`` → strategies/quickstart.yaml)."""
    candidates = [Path(ref)]
    if relative_to is not None:
        candidates.insert(0, relative_to / ref)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    shipped = shipped_strategies()
    if ref in shipped:
        return shipped[ref]
    if ref.endswith((".yaml", ".yml", ".json")) or "/" in ref:
        raise StrategyError([f"strategy file '{ref}' not found"],
                            hint="check the path, or run `llfarm strategies list` for shipped names")
    raise StrategyError([f"unknown strategy '{ref}'{did_you_mean(ref, shipped)}"],
                        hint="run `llfarm strategies list` for shipped names, or pass a path")


# ---------------------------------------------------------------- YAML with line numbers

def _line_map(node: yaml.Node, prefix: str = "", out: dict[str, int] | None = None) -> dict[str, int]:
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = key_node.start_mark.line + 1
            _line_map(value_node, key + ".", out)
    return out


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """A strategy file's mapping and the line of every key (see llfarm.yamlload: UTF-8, no duplicate keys,
    bounded aliases)."""
    from .yamlload import load, read_text
    data, node = load(read_text(path), str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise StrategyError([f"expected a mapping of keys (name:, model:, data: ...), received a "
                             f"{type(data).__name__}"], where=str(path),
                            hint="a strategy is a YAML mapping; see `llfarm strategies show quickstart`")
    return data, (_line_map(node) if node is not None else {})


# ---------------------------------------------------------------- merging and overrides

def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data and not prefix.startswith("backend_options."):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = copy.deepcopy(v)
    return merged


def parse_set(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise StrategyError([f"--set expects key.path=value, received '{item}'"],
                            hint="for example --set training.max_steps=20")
    from .yamlload import load
    try:
        value = load(raw, f"--set {key}")[0] if raw.strip() else ""
    except StrategyError as exc:
        if "malformed YAML" not in exc.message:
            raise
        value = raw
    return key, value


def set_path(data: dict[str, Any], key: str, value: Any) -> None:
    """``data[a][b][c] = value`` for key ``a.b.c``; a path through a value that is not a section is the --set's
    error (not the strategy file's)."""
    parts = key.split(".")
    if not all(parts):
        raise StrategyError([f"--set {key}: empty part in the key path"],
                            hint="for example --set training.max_steps=20")
    cur = data
    for i, p in enumerate(parts[:-1]):
        nxt = cur.get(p)
        if nxt is None:
            nxt = {}
            cur[p] = nxt
        elif not isinstance(nxt, dict):
            section = ".".join(parts[:i + 1])
            raise StrategyError([f"--set {key}: '{section}' is a value ({_short(nxt)}), not a section with keys"],
                                hint=f"set '{section}' itself, e.g. --set {section}=...")
        cur = nxt
    cur[parts[-1]] = value


def absolute_path(key: str, value: Any, base: Path) -> Any:
    """A path-valued key's relative path made absolute against ``base``: the strategy file's folder for values in a
    file, the current directory for ``--set``. Stored absolute, the resolved strategy means the same thing to the
    training child (which runs in the run directory) and to later commands run from anywhere. Names that are not
    paths (builtin:NAME, a hub id, a shipped template, zero2) are left as they are."""
    if key == "preference.rewards" and isinstance(value, list):    # file.py:function → absolute file
        return [f"{absolute_path('data.train', v.rpartition(':')[0], base)}:{v.rpartition(':')[2]}"
                if isinstance(v, str) and ".py:" in v else v for v in value]
    if key in ("data.train", "data.eval") and isinstance(value, list):   # a list of sources
        return [{**v, "path": absolute_path(key, v["path"], base)} if isinstance(v, dict) and "path" in v
                else absolute_path(key, v, base) for v in value]
    if not isinstance(value, str) or not value:
        return value
    if value.startswith("~"):
        value = str(Path(value).expanduser())
    if Path(value).is_absolute():
        return value
    if key in ("data.train", "data.eval"):
        is_path = ":" not in value.split("/")[0]
    elif key == "distributed.deepspeed":
        is_path = value.endswith(".json")
    elif key == "template":
        is_path = value.endswith((".yaml", ".yml"))
    elif key == "model.path":
        is_path = value.startswith(".") or (base / value).is_dir()
    elif key == "preference.reward_model":
        is_path = True
    else:
        return value
    return str((base / value).resolve()) if is_path else value


def _absolutize_paths(data: dict[str, Any], base: Path) -> None:
    for key in PATH_KEYS:
        section, _, leaf = key.rpartition(".")
        holder = data.get(section) if section else data
        if isinstance(holder, dict) and leaf in holder:
            holder[leaf] = absolute_path(key, holder[leaf], base)


def _load_layers(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """The merged data of a file and its `extends` ancestors, with a source for each leaf."""
    if path in chain:
        cycle = " → ".join(p.name for p in (*chain, path))
        raise StrategyError([f"extends forms a cycle: {cycle}"], where=str(path))
    data, lines = read_yaml(path)
    _absolutize_paths(data, path.parent)
    sources = {k: f"{path}:{line}" for k, line in lines.items()}
    parent_ref = data.get("extends")
    if parent_ref is None:
        return data, sources
    if not isinstance(parent_ref, str):
        raise StrategyError([f"extends: expected a strategy name or path, received {parent_ref!r}"],
                            where=f"{path}:{lines.get('extends', '?')}")
    try:
        parent_path = find_strategy(parent_ref, relative_to=path.parent)
    except StrategyError as exc:
        raise StrategyError([f"extends: {exc.message}"], where=f"{path}:{lines.get('extends', '?')}",
                            hint=exc.hint) from None
    parent, parent_sources = _load_layers(parent_path, (*chain, path))
    parent.pop("extends", None)
    merged = deep_merge(parent, data)
    all_sources = {k: f"extends {parent_ref} ({v})" for k, v in parent_sources.items()}
    all_sources.update(sources)
    return merged, all_sources


# ---------------------------------------------------------------- validation

def _model_at(loc: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = root
    for part in loc:
        if model is None or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        models = [a for a in (typing.get_args(ann) or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = models[0] if len(models) == 1 else None     # a section, or an optional one (X | None)
    return model


def _describe(err: dict[str, Any], root: type[BaseModel], base: tuple[Any, ...] = ()) -> str:
    """One problem in the user's words. ``err["loc"]`` is relative to ``root``, which sits at ``base``."""
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in (*base, *loc))
    kind = err["type"]
    received = _short(err.get("input"))
    if kind == "llfarm":                     # llfarm's own check, already in the user's words
        return err["msg"]
    if kind == "llfarm_combination":         # a rule between keys, blamed on the key it names
        return f"'{err['ctx']['key']}' {err['ctx']['problem']}"
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1], root)
        hint = did_you_mean(str(loc[-1]), parent.model_fields) if parent else ""
        return f"unknown key '{key}'{hint}"
    if kind == "missing":
        return f"'{key}' is required"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        value = err.get("input")
        choices = re.findall(r"'([^']*)'", expected)
        close = did_you_mean(value, choices) if isinstance(value, str) else ""
        if len(choices) > 8:                 # a long list (optimizers, schedulers): the closest, and how many
            return f"'{key}' must be one of {len(choices)} values ({', '.join(choices[:4])}, ...), received " \
                   f"{received}{close}"
        return f"'{key}' must be {expected}, received {received}{close}"
    msg = err["msg"]
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        return f"'{key}' {msg}" if key else msg
    return f"'{key}' {msg[0].lower() + msg[1:]}, received {received}"


def _short(value: Any) -> str:
    """repr of a value for a message, never unbounded (a huge or deeply nested value is cut short)."""
    import reprlib
    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxstring, r.maxother = 2, 4, 4, 60, 60
    return r.repr(value)


def _backend_problems(data: dict[str, Any]) -> list[tuple[dict[str, Any], type[BaseModel], tuple[Any, ...]]]:
    """The backend name and each backend_options.<name> block, checked against the registered backends."""
    from .backend import backend_names, registry

    problems: list[tuple[dict[str, Any], type[BaseModel], tuple[Any, ...]]] = []
    name = data.get("backend")
    if isinstance(name, str) and name not in backend_names():
        problems.append(({"loc": ("backend",), "type": "llfarm",
                          "msg": f"unknown backend '{name}'{did_you_mean(name, backend_names())}; expected "
                                 f"{one_of(backend_names())}"}, Strategy, ()))
    options = data.get("backend_options")
    if not isinstance(options, dict):
        return problems                     # the schema reports the wrong type
    backends = registry()
    for bname, value in options.items():
        if bname not in backends:
            problems.append(({"loc": (bname,), "type": "llfarm",
                              "msg": f"backend_options.{bname}: unknown backend '{bname}'"
                                     f"{did_you_mean(str(bname), backends)}; expected {one_of(backends)}"},
                             Strategy, ("backend_options",)))
            continue
        model = backends[bname].options
        try:
            model.model_validate(value if value is not None else {})
        except ValidationError as exc:
            problems += [(err, model, ("backend_options", bname)) for err in exc.errors()]
    return problems


def validate(data: dict[str, Any], *, file: Path | None = None,
             sources: dict[str, str] | None = None) -> Strategy:
    """The Strategy, or one StrategyError listing every problem with its key path and file:line."""
    sources = sources or {}
    errors: list[tuple[dict[str, Any], type[BaseModel], tuple[Any, ...]]] = []
    strategy = None
    try:
        strategy = Strategy.model_validate(data)
    except ValidationError as exc:
        errors += [(err, Strategy, ()) for err in exc.errors()]
    errors += _backend_problems(data)
    if not errors:
        assert strategy is not None
        return strategy
    found = []
    for err, root, base in errors:
        key = err["ctx"]["key"] if err["type"] == "llfarm_combination" else \
            ".".join(str(p) for p in (*base, *err["loc"]))
        found.append((_describe(err, root, base), _origin(key, sources)))
    if len(found) == 1:
        problem, origin = found[0]
        problems, where = [problem], origin or (str(file) if file else None)
    else:
        problems = [f"{p} [{o}]" if o else p for p, o in found]
        where = str(file) if file else None
    option_hints = {getattr(root, "HINT", None) for _, root, _ in errors} - {None}
    hint = (next(iter(option_hints)) if len(option_hints) == 1 and len(errors) == 1 else
            "see `llfarm strategies show quickstart` or the README's strategy reference")
    raise StrategyError(problems, where=where, hint=hint) from None


def strategy_keys() -> set[str]:
    """Every key path of the schema (training.learning_rate, ...)."""
    def walk(model: type[BaseModel], prefix: str) -> set[str]:
        out: set[str] = set()
        for name, info in model.model_fields.items():
            ann = info.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out |= walk(ann, f"{prefix}{name}.")
            else:
                out.add(prefix + name)
        return out
    return walk(Strategy, "")


def _origin(key: str, sources: dict[str, str]) -> str | None:
    if key not in sources:          # a section given in parts (--set training.early_stopping.patience=3)
        inside = [v for k, v in sources.items() if k.startswith(key + ".")]
        if inside:
            return inside[-1]
    while key:
        if key in sources:
            return sources[key]
        key = key.rpartition(".")[0]
    return None


def resolve(ref: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Resolved:
    path = find_strategy(str(ref))
    data, sources = _load_layers(path)
    for item in overrides:
        key, value = parse_set(item)
        set_path(data, key, absolute_path(key, value, Path.cwd()))
        for k in [key, *(_flatten(value, key + ".") if isinstance(value, dict) else [])]:
            sources[k] = f"--set {item}"
    strategy = validate(data, file=path, sources=sources)
    return Resolved(strategy=strategy, file=path, sources=sources)


def raw_values(ref: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The merged values (extends + --set) before validation: for commands that fill in a value themselves."""
    data, _ = _load_layers(find_strategy(str(ref)))
    for item in overrides:
        key, value = parse_set(item)
        set_path(data, key, value)
    return data


def dump(resolved: Resolved) -> str:
    data = redact(resolved.strategy.model_dump(mode="json"))
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
