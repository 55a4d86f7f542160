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

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from components import registry
from components.api import Resources, StrictModel

MAX_FILE_BYTES = 1 << 20
MAX_ALIASES = 100
# Values a file may hold once its aliases are expanded: few aliases can still nest into billions
# (each of 40 levels naming the one below twice is 2**40), and every config is expanded when it
# is validated, hashed into a cache key and saved with the run.
MAX_NODES = 100_000
MAX_DEPTH = 200
STAGE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
TOP_LEVEL_KEYS = ("name", "storage", "tracking", "schedule")
STAGE_KEYS = ("uses", "needs", "with", "resources")


class PipelineError(ValueError):
    """A pipeline file (or an override) is invalid; the message names the file and key."""

    def __init__(self, source: str, key: str | None, problem: str):
        self.source, self.key, self.problem = source, key, problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


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

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    storage: str = "./runs"
    tracking: str | None = None
    schedule: str | None = None
    stages: dict[str, StageSpec]

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
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                continue  # unhashable keys are rejected by the validation that follows
            if key in seen:
                raise yaml.YAMLError(
                    f"duplicate key {key!r} at line {key_node.start_mark.line + 1} "
                    f"(first at line {seen[key]})"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


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


def parse_yaml(text: str, source: str) -> Any:
    """Parses YAML safely (no object construction, no duplicate keys, no alias bombs)."""
    try:
        return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - _SafeLoader is a SafeLoader
    except yaml.YAMLError as e:
        raise PipelineError(source, None, f"invalid YAML: {e}") from None


def read_pipeline_file(path: str | Path) -> dict[str, Any]:
    """Reads a pipeline file into plain data.

    Raises:
        PipelineError: the file is missing, unreadable, too large, not UTF-8, or not a YAML
            mapping.
    """
    source = str(path)
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise PipelineError(
                source, None, f"file is {size} bytes; pipeline files are limited to 1 MiB"
            )
        text = p.read_bytes().decode("utf-8")
    except PipelineError:
        raise
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
    data = parse_yaml(text, source)
    if not isinstance(data, dict):
        raise PipelineError(source, None, "expected a YAML mapping with `name` and `stages`")
    return data


def parse_value(text: str) -> Any:
    """Parses an override's value: numbers as numbers (``1e-3`` too), else as YAML."""
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return parse_yaml(text, "override") if text else ""


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Applies ``key=value`` overrides to raw pipeline data, returning a new mapping.

    ``stage.key=value`` sets ``stages.stage.with.key``; ``stage.resources.workers=2`` and
    ``stage.needs=[a]`` set those blocks; top-level keys (``storage=...``) are set directly.

    Raises:
        PipelineError: an override is malformed or names no stage or top-level key.
    """
    data = yaml.safe_load(yaml.safe_dump(data))  # a deep copy made of plain types
    for item in overrides:
        key, sep, raw = item.partition("=")
        path = key.strip().split(".")
        if not sep or not all(path):
            raise PipelineError(source, item, "an override is `stage.key=value` or `key=value`")
        value = parse_value(raw)
        if len(path) == 1:
            if path[0] not in TOP_LEVEL_KEYS:
                raise PipelineError(
                    source, key, f"not a top-level key; expected one of {', '.join(TOP_LEVEL_KEYS)}"
                )
            data[path[0]] = value
            continue
        stages = data.get("stages")
        if not isinstance(stages, dict) or path[0] not in stages:
            known = ", ".join(stages) if isinstance(stages, dict) else "none"
            raise PipelineError(source, key, f"no stage named {path[0]!r} (stages: {known})")
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
    shown = repr(got) if not isinstance(got, dict | list) else type(got).__name__
    if len(shown) > 80:
        shown = shown[:77] + "..."
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
        if not STAGE_NAME.match(name):
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
                    f"no stage named {need!r} (stages: {', '.join(spec.stages)})",
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


def _check_cron(source: str, expr: str) -> None:
    from croniter import croniter

    if not croniter.is_valid(expr) or len(expr.split()) != 5:
        raise PipelineError(
            source,
            "schedule",
            f"not a 5-field cron expression (minute hour day month weekday): {expr!r}",
        )


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
