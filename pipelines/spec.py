"""Pipeline files: loading, ``key=value`` overrides and validation, all before Ray starts.

A pipeline file is YAML::

    name: digits-vision
    storage: ./runs                      # a local path or a pyarrow.fs URI (s3://, gs://)
    tracking: sqlite:///runs/mlflow.db   # MLflow; default: SQLite under storage
    schedule: "0 3 * * 1"                # optional cron, used by `raypipe schedule`
    stages:
      prepare:
        uses: data.prepare
        with: {...}                      # validated against the component's Config
      classifier:
        uses: vision.train
        needs: [prepare]
        resources: {workers: 2, gpu: auto, cpus_per_worker: 1}

Every error is a :class:`PipelineError` naming the file and the key path
(``stages.classifier.with.lr``) with what was expected.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from components import registry
from components.api import Resources, StrictModel
from pipelines.guards import (
    PIPELINE_NAME,
    STAGE_NAME,
    InputError,
    TooLarge,
    clip,
    quote,
    read_bounded,
    storage_problem,
)

#: A pipeline file, and all the overrides of one command together, hold at most this much.
MAX_FILE_BYTES = 1 << 20
MAX_ALIASES = 100
# Values a file may hold once its aliases are expanded: few aliases can still nest into billions
# (each of 40 levels naming the one below twice is 2**40), and every config is expanded when it
# is validated, hashed into a cache key and saved with the run.
MAX_NODES = 100_000
MAX_DEPTH = 200
TOP_LEVEL_KEYS = ("name", "storage", "tracking", "schedule")
STAGE_KEYS = ("uses", "needs", "with", "resources")


class PipelineError(InputError):
    """A pipeline file (or an override) is invalid; the message names the file and key."""


class StageSpec(BaseModel):
    """One stage of a pipeline file."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    uses: str
    needs: list[str] = Field(default_factory=list)
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    resources: Resources = Field(default_factory=Resources)


class PipelineSpec(BaseModel):
    """A whole pipeline file, as written (component configs are checked separately)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=rf"^{PIPELINE_NAME.pattern}$")
    storage: str = "./runs"
    tracking: str | None = None
    schedule: str | None = None
    stages: dict[str, StageSpec]

    @field_validator("storage")
    @classmethod
    def _storage(cls, storage: str) -> str:
        problem = storage_problem(storage)
        if problem:
            raise ValueError(problem)
        return storage

    @field_validator("tracking")
    @classmethod
    def _tracking(cls, tracking: str | None) -> str | None:
        if tracking is not None and (not tracking.strip() or not tracking.isprintable()):
            raise ValueError("a tracking URI is printable text, not empty (or leave it out)")
        return tracking

    @field_validator("stages")
    @classmethod
    def _not_empty(cls, stages: dict[str, StageSpec]) -> dict[str, StageSpec]:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        return stages


@dataclass(frozen=True)
class Stage:
    """A validated stage: its spec plus the component's typed config."""

    name: str
    spec: StageSpec
    config: StrictModel

    @property
    def uses(self) -> str:
        return self.spec.uses

    @property
    def needs(self) -> list[str]:
        return self.spec.needs


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline: stages in a dependency order, ready for the engine."""

    source: str
    spec: PipelineSpec
    stages: dict[str, Stage]
    order: list[str]
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def storage(self) -> str:
        return self.spec.storage

    def descendants(self, names: set[str]) -> set[str]:
        """Returns ``names`` and every stage that depends on one of them, transitively."""
        found = set(names)
        for stage in self.order:  # topological: parents come first
            if any(need in found for need in self.stages[stage].needs):
                found.add(stage)
        return found

    def to_dict(self) -> dict[str, Any]:
        """The resolved pipeline (overrides applied) as plain data, as saved with a run."""
        return self.spec.model_dump(mode="json", by_alias=True)


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects duplicate keys, alias bombs and absurd nesting."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.alias_count = 0
        self.depth = 0

    def get_single_node(self):  # type: ignore[override]
        node = super().get_single_node()
        if node is not None:
            size, _ = _expanded(node, {})
            if size > MAX_NODES:
                raise yaml.YAMLError(
                    f"the document expands to {size:,} values once its aliases are followed "
                    f"(at most {MAX_NODES:,}); a 'billion laughs' bomb looks like this"
                )
        return node

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            self.alias_count += 1
            if self.alias_count > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(
                    f"more than {MAX_ALIASES} YAML aliases (line {mark.line + 1}); "
                    "alias-heavy files are refused (a 'billion laughs' bomb looks like this)"
                )
        # The composer recurses once per level: refuse deep nesting before Python's stack does.
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(
                    f"values nested more than {MAX_DEPTH} levels deep (line {mark.line + 1})"
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            # A key is a name: `on:`, `no:`, `1:` or `2024-01-01:` as written, never the
            # boolean, number or date YAML 1.1 would make of it (`on:` would be `True:`).
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag in _RESOLVED_KEY_TAGS:
                key_node.tag = "tag:yaml.org,2002:str"
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                continue  # unhashable keys are rejected by the validation that follows
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {quote(key)} at line {key_node.start_mark.line + 1} "
                    f"(first at line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_RESOLVED_KEY_TAGS = {
    f"tag:yaml.org,2002:{name}" for name in ("bool", "int", "float", "null", "timestamp")
}
# Booleans are `true` and `false` (YAML 1.2), not YAML 1.1's yes/no/on/off/y/n too: a stage
# named `on` or `needs: [yes]` means the name. (A boolean setting still takes "yes": the
# config models read such strings as booleans.)
_BOOL = "tag:yaml.org,2002:bool"
_SafeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SafeLoader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _expanded(node: yaml.Node, seen: dict[int, tuple[int, int]], depth: int = 1) -> tuple[int, int]:
    """(values, levels) of ``node`` with every alias expanded; each shared node is sized once.

    Raises:
        yaml.YAMLError: the expansion nests more than ``MAX_DEPTH`` levels.
    """
    key = id(node)
    if key in seen:
        size, height = seen[key]
    else:
        if depth > MAX_DEPTH:
            raise yaml.YAMLError(
                f"values nest more than {MAX_DEPTH} levels deep once aliases are followed "
                f"(line {node.start_mark.line + 1})"
            )
        seen[key] = (1, 1)  # a node that contains itself (a recursive alias) counts once
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        parts = [_expanded(child, seen, depth + 1) for child in children]
        size = 1 + sum(p[0] for p in parts)
        height = 1 + max((p[1] for p in parts), default=0)
        seen[key] = (size, height)
    if depth - 1 + height > MAX_DEPTH:
        raise yaml.YAMLError(
            f"values nest more than {MAX_DEPTH} levels deep once aliases are followed "
            f"(line {node.start_mark.line + 1})"
        )
    return size, height


def parse_yaml(text: str, source: str, key: str | None = None) -> Any:
    """Parses YAML safely (no object construction, no duplicate keys, no alias bombs).

    Args:
        text: the YAML.
        source: the file it comes from, for errors.
        key: the key its value is for (an override's), for errors; by default the key path
            is read from the lines above the error.

    Raises:
        PipelineError: ``source: key path: invalid YAML at line L, column C: reason``.
    """
    try:
        return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - _SafeLoader is a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        if not isinstance(e, yaml.MarkedYAMLError) or mark is None:
            raise PipelineError(source, key, f"invalid YAML: {e}") from None
        reason = " ".join(str(p) for p in (e.context, e.problem) if p)
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        if key is None:
            key = _key_path_at(text, mark.line)
        raise PipelineError(source, key, f"invalid YAML at {where}: {reason}") from None


_KEY_LINE = re.compile(r"( *)(- +)?(\"[^\"]*\"|'[^']*'|[^\s#'\"\[\]{},&*!|>%@`-][^#]*?) *:(?:\s|$)")


def _key_path_at(text: str, line: int) -> str | None:
    """The key path (``stages.a.with``) of block-style YAML at ``line``, read from the
    indentation of the keys above it: where a syntax error is, for its message."""
    path: list[tuple[int, str]] = []
    for raw in text.splitlines()[: line + 1]:
        match = _KEY_LINE.match(raw)
        if not match:
            continue
        indent = len(match[1]) + len(match[2] or "")
        while path and path[-1][0] >= indent:
            path.pop()
        path.append((indent, match[3].strip("'\"")))
    return ".".join(key for _, key in path) or None


def read_pipeline_file(path: str | Path) -> dict[str, Any]:
    """Reads a pipeline file into plain data.

    Raises:
        PipelineError: the file is missing, unreadable, too large, not UTF-8, or not a YAML
            mapping.
    """
    source = str(path)
    try:
        # Bounded for any kind of file: /dev/zero, a FIFO without a writer, a terminal.
        text = read_bounded(path, MAX_FILE_BYTES).decode("utf-8")
    except TooLarge as e:
        held = f"is {e.size:,} bytes" if e.size is not None else "holds more than 1 MiB"
        problem = f"file {held}; pipeline files are limited to 1 MiB"
        raise PipelineError(source, None, problem) from None
    except TimeoutError as e:
        raise PipelineError(source, None, f"cannot read: {e}") from None
    except FileNotFoundError:
        raise PipelineError(source, None, "no such file") from None
    except IsADirectoryError:
        raise PipelineError(source, None, "is a directory, not a pipeline file") from None
    except UnicodeDecodeError as e:
        raise PipelineError(
            source, None, f"not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    except OSError as e:
        raise PipelineError(source, None, f"cannot read: {e.strerror}") from None
    except ValueError as e:  # a NUL in the name
        raise PipelineError(source, None, f"cannot read: {e}") from None
    data = parse_yaml(text, source)
    if not isinstance(data, dict):
        raise PipelineError(source, None, "expected a YAML mapping with `name` and `stages`")
    return data


def parse_value(text: str, source: str = "override", key: str | None = None) -> Any:
    """Parses an override's value: numbers as numbers (``1e-3`` too), else as YAML.

    Raises:
        PipelineError: the value is not valid YAML (naming ``source`` and ``key``).
    """
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return parse_yaml(text, source, key) if text else ""


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Applies ``key=value`` overrides to raw pipeline data, returning a new mapping.

    ``stage.key=value`` sets ``stages.stage.with.key``; ``stage.resources.workers=2`` and
    ``stage.needs=[a]`` set those blocks; top-level keys (``storage=...``) are set directly.

    Raises:
        PipelineError: an override is malformed or names no stage or top-level key.
    """
    size = sum(len(item.encode("utf-8", "replace")) for item in overrides)
    if size > MAX_FILE_BYTES:
        raise PipelineError(
            source, "overrides", f"{size:,} bytes in all; overrides are limited to 1 MiB"
        )
    data = yaml.safe_load(yaml.safe_dump(data))  # a deep copy made of plain types
    for item in overrides:
        key, sep, raw = item.partition("=")
        path = key.strip().split(".")
        if not sep or not all(path):
            raise PipelineError(
                source, quote(item), "an override is `stage.key=value` or `key=value`"
            )
        value = parse_value(raw, source, key)
        if len(path) == 1:
            if path[0] not in TOP_LEVEL_KEYS:
                raise PipelineError(
                    source, key, f"not a top-level key; expected one of {', '.join(TOP_LEVEL_KEYS)}"
                )
            data[path[0]] = value
            continue
        stages = data.get("stages")
        if not isinstance(stages, dict) or path[0] not in stages:
            known = _names(stages) if isinstance(stages, dict) else "none"
            raise PipelineError(source, key, f"no stage named {quote(path[0])} (stages: {known})")
        target = stages[path[0]]
        rest = path[1:] if path[1] in STAGE_KEYS else ["with", *path[1:]]
        for part in rest[:-1]:
            child = target.setdefault(part, {}) if isinstance(target, dict) else None
            if not isinstance(child, dict):
                raise PipelineError(
                    source, key, f"{part!r} is not a mapping, cannot set a key in it"
                )
            target = child
        target[rest[-1]] = value
    return data


# Parts pydantic adds to an error's location for union branches; they are not keys.
_UNION_BRANCH = re.compile(r"^([a-z-]+\[.*\]|bool|int|float|str|list|dict|none)$")


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not _UNION_BRANCH.match(str(p)))


def _describe(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "missing":
        return "required key is missing"
    got = error.get("input")
    shown = quote(got) if not isinstance(got, dict | list) else type(got).__name__
    return f"{error['msg']} (got {shown})"


def _raise_validation(source: str, prefix: str, err: ValidationError, model: type) -> None:
    first = err.errors()[0]
    key = ".".join(p for p in (prefix, _loc(first["loc"])) if p)
    problem = _describe(first)
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(_field_names(model, first["loc"][:-1]))
        problem += f"; expected one of: {allowed}" if allowed else ""
    more = len(err.errors()) - 1
    if more:
        problem += f" (and {more} more problem{'s' if more > 1 else ''})"
    raise PipelineError(source, key, problem) from None


def _field_names(model: type, loc: tuple[Any, ...]) -> list[str]:
    """Best-effort list of the keys a (nested) model accepts at ``loc``, for error messages."""
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    fields = getattr(model, "model_fields", {})
    return [f.alias or name for name, f in fields.items()]


def _check_graph(source: str, spec: PipelineSpec) -> list[str]:
    """Checks stage names and ``needs``; returns a topological order (file order kept)."""
    for name, stage in spec.stages.items():
        if not STAGE_NAME.fullmatch(name):
            raise PipelineError(
                source,
                f"stages.{name}",
                "a stage name is ASCII letters, digits, '_' and '-', starting with a letter "
                "or '_' (at most 64 characters; no path separators)",
            )
        for i, need in enumerate(stage.needs):
            if need not in spec.stages:
                raise PipelineError(
                    source,
                    f"stages.{name}.needs.{i}",
                    f"no stage named {quote(need)} (stages: {_names(spec.stages)})",
                )
            if need == name:
                raise PipelineError(
                    source, f"stages.{name}.needs.{i}", "a stage cannot need itself"
                )
        if len(set(stage.needs)) != len(stage.needs):
            raise PipelineError(source, f"stages.{name}.needs", "names a stage twice")
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join([*path[path.index(name) :], name])
            raise PipelineError(source, f"stages.{name}.needs", f"dependency cycle: {cycle}")
        state[name] = "visiting"
        for need in spec.stages[name].needs:
            visit(need, [*path, name])
        state[name] = "done"
        order.append(name)

    for name in spec.stages:
        visit(name, [])
    return order


def _names(names: Any) -> str:
    """Names listed in a message (bounded: a file may hold thousands)."""
    return clip(", ".join(str(n) for n in names), 200)


def cron_problem(expr: str) -> str | None:
    """Why ``expr`` is not a usable schedule (None when it is): a 5-field cron expression
    (minute hour day month weekday) that fires at least once."""
    from croniter import CroniterBadDateError, croniter

    if len(expr.split()) != 5 or not croniter.is_valid(expr):
        return f"not a 5-field cron expression (minute hour day month weekday): {quote(expr)}"
    try:
        croniter(expr, dt.datetime(2000, 1, 1, tzinfo=dt.UTC)).get_next(float)
    except (CroniterBadDateError, ValueError, OverflowError):
        return f"the cron expression {quote(expr)} never fires (no such date)"
    return None


def _check_cron(source: str, expr: str) -> None:
    problem = cron_problem(expr)
    if problem:
        raise PipelineError(source, "schedule", problem)


def validate(data: Any, source: str = "<pipeline>", overrides: tuple[str, ...] = ()) -> Pipeline:
    """Validates raw pipeline data (overrides already applied) into a :class:`Pipeline`.

    Raises:
        PipelineError: the first problem found, naming ``source`` and the key path.
    """
    if not isinstance(data, dict):
        raise PipelineError(source, None, "expected a YAML mapping with `name` and `stages`")
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as e:
        _raise_validation(source, "", e, PipelineSpec)
    order = _check_graph(source, spec)
    if spec.schedule is not None:
        _check_cron(source, spec.schedule)
    stages: dict[str, Stage] = {}
    for name, stage_spec in spec.stages.items():
        try:
            component = registry.get(stage_spec.uses)
        except KeyError as e:
            raise PipelineError(source, f"stages.{name}.uses", e.args[0]) from None
        try:
            config = component.Config.model_validate(stage_spec.with_)
        except ValidationError as e:
            _raise_validation(source, f"stages.{name}.with", e, component.Config)
        stages[name] = Stage(name, stage_spec, config)
    return Pipeline(source, spec, stages, order, tuple(overrides))


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Pipeline:
    """Reads, overrides and validates a pipeline file.

    Args:
        path: the YAML file.
        overrides: ``stage.key=value`` strings applied before validation.

    Raises:
        PipelineError: anything wrong with the file or the overrides.
    """
    source = str(path)
    data = read_pipeline_file(path)
    if overrides:
        data = apply_overrides(data, list(overrides), source)
    return validate(data, source, tuple(overrides))
