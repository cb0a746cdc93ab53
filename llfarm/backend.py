"""The backend protocol and registry.

A backend is a translator and a normalizer: ``check`` says whether it can run a strategy here (cheap, no
heavy imports; it sees the prepared data, so every refusal comes before anything is written), ``compile`` writes
the native files and returns the command (pure: testable anywhere), and ``collect`` maps what it wrote into the
normalized run directory. Process control, logs, progress, signals and resume live once, in the runner.

Backends are data to the core: each registers as an entry point in the ``llfarm.backends`` group (pyproject.toml)
and declares its name, ``priority`` for ``--backend auto``, whether it is the ``default``, a ``summary``, the
``extra`` that installs it, the ``packages`` it needs to run, the ``distributions`` whose versions a manifest
records, a pydantic model of its ``backend_options`` and a capability table. Unsupported features are data
(``Capabilities``), turned into one clear error. The core names no backend.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from .errors import BackendUnavailable, UnsupportedError, did_you_mean, one_of
from .platform import Platform
from .schema import Section

if TYPE_CHECKING:
    from .data import PreparedData
    from .rundir import RunDir
    from .schema import Strategy


@dataclass(frozen=True)
class Capabilities:
    stages: frozenset[str]
    methods: frozenset[str]
    quantization: frozenset[str]          # none | 4bit | 8bit
    platforms: frozenset[str]             # cpu | cuda | mps
    launchers: frozenset[str] = frozenset({"none"})
    # Stages whose checkpoints `llfarm resume` can continue from (default: every stage).
    resumable: frozenset[str] | None = None
    # Strategy keys the backend cannot honour: "method.use_dora" (any value but the default) or
    # "method.init=olora" (that value), each with the reason shown to the user.
    unsupported: dict[str, str] = field(default_factory=dict)
    # Why something is missing, keyed like "stage:rm", "platform:cpu" or "resume:rm": shown to the user verbatim.
    reasons: dict[str, str] = field(default_factory=dict)

    def table(self) -> dict[str, list[str]]:
        return {"stages": sorted(self.stages), "methods": sorted(self.methods),
                "quantization": sorted(self.quantization), "platforms": sorted(self.platforms),
                "launchers": sorted(self.launchers)}


@dataclass
class CompileContext:
    """Everything a backend needs to compile a strategy for one run."""
    strategy: Strategy
    run: RunDir
    platform: Platform
    model_path: str                 # absolute local directory or a hub id
    data: PreparedData              # normalized data files written by the core
    precision: str                  # fp32 | bf16 | fp16 (auto already resolved)
    resume_from: Path | None = None  # a checkpoint directory to resume from


@dataclass
class NativePlan:
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    files: list[Path]               # native files written (`plan` prints them)
    total_steps: int | None = None
    trainer: str = ""               # what receives the trainer arguments, e.g. trl.SFTTrainer(args=...)
    # Passed to the child and never written anywhere (secret-named backend options): shown as KEY=*** in command.txt.
    secret_env: dict[str, str] = field(default_factory=dict)

    def command_line(self) -> str:
        import shlex
        shown = {**self.env, **{k: "***" for k in self.secret_env}}
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(shown.items()))
        cmd = " ".join(shlex.quote(a) for a in self.argv)
        return f"cd {shlex.quote(str(self.cwd))} && {env + ' ' if env else ''}{cmd}"


@dataclass
class RunResult:
    output_kind: str                # adapter | model
    output_dir: Path
    final_metrics: dict[str, Any] = field(default_factory=dict)


class NoOptions(Section):
    """A backend that takes no raw options."""


class Backend:
    name: str = ""
    summary: str = ""               # one line for `llfarm backends`
    priority: int = 100             # --backend auto tries backends in this order (lowest first)
    default: bool = False           # the backend a strategy without `backend:` uses
    extra: str | None = None        # pip extra that installs it
    packages: tuple[str, ...] = ()  # importable modules that must be present to *run*
    distributions: tuple[str, ...] = ()  # libraries whose versions a run's manifest records
    options: type[BaseModel] = NoOptions  # the model of backend_options.<name>
    importer: Any = None            # llfarm.importers.Importer for `llfarm import --from <name>`, if it has a format
    capabilities: Capabilities

    # ---- protocol -------------------------------------------------------------------------
    def check(self, strategy: Strategy, platform: Platform, data: PreparedData | None = None) -> None:
        """Raise UnsupportedError / BackendUnavailable when this backend cannot run the strategy here. ``data``
        (when prepared) lets a backend refuse what its own data path cannot take before anything is written."""
        self.check_capabilities(strategy, platform)
        self.check_installed()

    def compile(self, ctx: CompileContext) -> NativePlan:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.compile")

    def collect(self, ctx: CompileContext) -> RunResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.collect")

    # ---- shared helpers -------------------------------------------------------------------
    def option_values(self, strategy: Strategy) -> dict[str, Any]:
        """backend_options.<name> as validated by ``options`` (only the keys the strategy set)."""
        return self.options.model_validate(strategy.backend_options.get(self.name, {})).model_dump(
            exclude_unset=True)

    def missing_packages(self) -> list[str]:
        return [p for p in self.packages if importlib.util.find_spec(p) is None]

    def check_installed(self) -> None:
        if _PLANNING.get():
            return  # plan only compiles; the package is needed to run, not to plan (ibis-style)
        missing = self.missing_packages()
        if missing:
            raise BackendUnavailable(
                f"backend '{self.name}' needs {', '.join(missing)}, which "
                f"{'is' if len(missing) == 1 else 'are'} not installed",
                hint=f'pip install "llfarm[{self.extra}]"' if self.extra else None)

    def check_capabilities(self, strategy: Strategy, platform: Platform) -> None:
        caps = self.capabilities
        wanted = [("stage", strategy.stage, caps.stages), ("method", strategy.method.type, caps.methods),
                  ("quantization", strategy.quantization, caps.quantization),
                  ("launcher", strategy.distributed.launcher, caps.launchers),
                  ("platform", platform.name, caps.platforms)]
        for what, value, allowed in wanted:
            if value not in allowed:
                self.refuse(what, value, f"it supports {what} {one_of(allowed)}")
        if strategy.quantization != "none" and platform.name != "cuda":
            what = strategy.method.type if strategy.method.type == "qlora" else "model.quantization"
            raise UnsupportedError(
                f"{what} ({strategy.quantization} bitsandbytes) needs a CUDA GPU; this machine has "
                f"{platform.accelerator}",
                hint="use method.type: lora and model.quantization: none on this machine, or run on a CUDA GPU")
        from .distributed import check_deepspeed, check_fsdp
        check_deepspeed(strategy, platform)
        check_fsdp(strategy, platform)
        from .training import CUDA_ONLY
        if platform.name != "cuda":
            for key, (values, why) in CUDA_ONLY.items():
                value = value_at(strategy, key)
                if value in values:
                    raise UnsupportedError(f"{value!r} needs CUDA: {why}; this machine has {platform.accelerator}",
                                           where=key, hint="choose another value here, or run on a CUDA GPU")
        for spec, why in caps.unsupported.items():
            key, _, only = spec.partition("=")
            value = value_at(strategy, key)
            if (str(value) == only) if only else value != default_at(key):
                raise UnsupportedError(f"backend '{self.name}' cannot run {key} = {value!r}: {why}", where=key,
                                       hint=self._alternatives_hint(spec))

    def _alternatives_hint(self, spec: str) -> str | None:
        others = [b.name for b in registry().values() if b.name != self.name and
                  spec not in b.capabilities.unsupported]
        return ("try " + " or ".join(f"--backend {a}" for a in others)) if others else None

    def check_resume(self, strategy: Strategy) -> None:
        resumable = self.capabilities.resumable
        if resumable is not None and strategy.stage not in resumable:
            self.refuse("resume", strategy.stage, f"it resumes stage {one_of(resumable)}",
                        f"resume a stage '{strategy.stage}' run")

    def refuse(self, what: str, value: str, default_reason: str, action: str | None = None) -> None:
        reason = self.capabilities.reasons.get(f"{what}:{value}", default_reason)
        alternatives = [b.name for b in registry().values() if b.name != self.name and _supports(b, what, value)]
        hint = ("try " + " or ".join(f"--backend {a}" for a in alternatives)) if alternatives else None
        raise UnsupportedError(f"backend '{self.name}' cannot {action or f'run {what} {value!r}'}: {reason}",
                               hint=hint)


def value_at(strategy: Strategy, key: str) -> Any:
    obj: Any = strategy
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def default_at(key: str) -> Any:
    """The schema default of a strategy key (training.packing → False)."""
    from .schema import Strategy
    model: Any = Strategy
    parts = key.split(".")
    for part in parts[:-1]:
        model = model.model_fields[part].annotation
    info = model.model_fields[parts[-1]]
    return info.get_default(call_default_factory=True)


def _supports(backend: Backend, what: str, value: str) -> bool:
    caps = backend.capabilities
    if what == "resume":
        return caps.resumable is None or value in caps.resumable
    return value in {"stage": caps.stages, "method": caps.methods, "quantization": caps.quantization,
                     "launcher": caps.launchers, "platform": caps.platforms}[what]


def offline_env(ctx: CompileContext) -> dict[str, str]:
    """A local model needs no hub: the child runs with HF_HUB_OFFLINE=1 (a hub id keeps the hub reachable)."""
    return {"HF_HUB_OFFLINE": "1"} if Path(ctx.model_path).is_dir() else {}


def launcher_argv(ctx: CompileContext, python: list[str], entry: list[str]) -> list[str]:
    """``python -m entry...`` under the strategy's launcher (torchrun, accelerate launch, DeepSpeed's launcher),
    or as it is: see llfarm.distributed."""
    from .distributed import launch_argv
    return launch_argv(ctx, python, entry)


_PLANNING: ContextVar[bool] = ContextVar("llfarm_planning", default=False)


@contextmanager
def planning() -> Iterator[None]:
    """Within this block backends are checked for what the strategy asks, not for installed packages."""
    token = _PLANNING.set(True)
    try:
        yield
    finally:
        _PLANNING.reset(token)


_REGISTRY: dict[str, Backend] | None = None
BROKEN: dict[str, str] = {}


def registry() -> dict[str, Backend]:
    """Every registered backend, in the order `--backend auto` tries them (each backend's ``priority``)."""
    global _REGISTRY
    if _REGISTRY is None:
        found: dict[str, Backend] = {}
        for ep in entry_points(group="llfarm.backends"):
            try:
                found[ep.name] = ep.load()
            except ImportError as exc:  # a plugin whose module is broken must not break the others
                BROKEN[ep.name] = f"{ep.value} failed to import: {exc}"
        _REGISTRY = dict(sorted(found.items(), key=lambda kv: (kv[1].priority, kv[0])))
    return _REGISTRY


def default_backend() -> str:
    """The backend a strategy without ``backend:`` runs on (the one that declares itself the default)."""
    defaults = [b.name for b in registry().values() if b.default]
    return defaults[0] if defaults else "auto"


def backend_names() -> list[str]:
    return [*registry(), "auto"]


def get_backend(name: str) -> Backend:
    backends = registry()
    if name not in backends:
        raise UnsupportedError(f"unknown backend '{name}'{did_you_mean(name, backends)}", where="backend",
                               hint=f"expected {one_of([*backends, 'auto'])}")
    return backends[name]


def plan_platform(strategy: Strategy, here: Platform, requested: str | None = None,
                  data: PreparedData | None = None) -> Platform:
    """The platform `llfarm plan` compiles for. Planning runs nothing: when the backend asked for (or, for auto,
    every backend) cannot run the strategy on this machine but could on a CUDA GPU (Unsloth; 4-bit QLoRA), the
    plan is for a CUDA GPU, and `run` still checks the machine. Otherwise it is for this machine, so `auto` shows
    the backend `run` would pick here."""
    name = requested or strategy.backend
    candidates = list(registry().values()) if name == "auto" else [registry()[name]] if name in registry() else []
    gpu = Platform("cuda", f"planned for a CUDA GPU; this machine has {here.accelerator}", bf16=True)

    def runs_on(plat: Platform) -> bool:
        for backend in candidates:
            try:
                with planning():
                    backend.check(strategy, plat, data)
                return True
            except (UnsupportedError, BackendUnavailable):
                pass
        return False

    if here.name == "cuda" or runs_on(here) or not runs_on(gpu):
        return here
    return gpu


def choose_backend(strategy: Strategy, platform: Platform, requested: str | None = None,
                   data: PreparedData | None = None) -> Backend:
    """The backend named by --backend or the strategy; for 'auto', the first one that can run here."""
    name = requested or strategy.backend
    if name != "auto":
        backend = get_backend(name)
        backend.check(strategy, platform, data)
        return backend
    reasons = []
    for backend in registry().values():
        try:
            backend.check(strategy, platform, data)
            return backend
        except (UnsupportedError, BackendUnavailable) as exc:
            reasons.append(f"{backend.name}: {exc.message}")
    raise UnsupportedError("no backend can run this strategy here: " + "; ".join(reasons),
                           hint="run `llfarm backends` to see what each backend needs")
