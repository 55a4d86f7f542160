"""Generated hostile input (issue 16): pipeline files, overrides and run records made by
Hypothesis go through `raypipe validate`, `show` and `runs`. Whatever they hold, the CLI
answers with exit 0, or with exit 2 and one `error:` line: never a traceback, never exit 3 (a
bug in raypipe), never an error line of unbounded length.

The examples are few and derandomized (CI's time is short and a failure must repeat); the
strategies lean on what broke before: YAML 1.1 words as keys, numbers at and past every bound
(huge, negative, NaN, infinite, booleans), control characters and long strings, known keys in
wrong places, and run records with one key mistyped or cut short.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helpers import good_record, invoke

from pipelines.record import RUN_FILE

pytestmark = pytest.mark.reliability

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

KEYS = [
    "name", "storage", "tracking", "schedule", "stages", "uses", "needs", "with", "resources",
    "workers", "cpus_per_worker", "gpu", "seconds", "value", "message", "source", "kind",
    "paths", "num_classes", "augment", "jitter", "noise", "split", "space", "samples",
    "on", "yes", "no", "1", "~", "<<", "a\nb", "../x", "\u202e",
]  # fmt: skip
COMPONENTS = ["test.sleep", "test.fail", "data.prepare", "tune.search", "vision.train", "no.such"]
NUMBERS = st.one_of(
    st.integers(),
    st.sampled_from([0, -1, 1, 2**63, -(2**63) - 1, 10**12, 10**100]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
TEXT = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", " ", "0 0 31 2 *", "s3://K:S@b/x", "foo://x", "/dev/zero", "a" * 3000]),
    st.sampled_from(KEYS + COMPONENTS),
)
SCALARS = st.one_of(st.none(), NUMBERS, TEXT)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=4),
    ),
    max_leaves=12,
)


@st.composite
def pipelines(draw) -> str:
    """A pipeline file: a plausible one with values swapped for hostile ones, or any text."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.text(max_size=200))
    stages = {}
    for name in draw(st.lists(st.sampled_from(KEYS + ["a", "b"]), min_size=1, max_size=3)):
        stage = {"uses": draw(st.sampled_from(COMPONENTS))}
        for key in draw(st.lists(st.sampled_from(["needs", "with", "resources"]), max_size=3)):
            stage[key] = draw(VALUES)
        stages[name] = stage
    data = {"name": draw(st.one_of(st.just("p"), TEXT)), "stages": stages}
    for key in draw(st.lists(st.sampled_from(["storage", "tracking", "schedule", "x"]))):
        data[key] = draw(VALUES)
    text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    if draw(st.booleans()):  # and then damaged: cut short, or a character put in
        cut = int(draw(st.floats(0, 1)) * len(text))
        text = text[:cut] + draw(st.sampled_from(["", "{", "[", '"', ":", "\t", "&a *a", "!!x"]))
    return text


OVERRIDES = st.lists(
    st.builds(
        lambda key, value: f"{key}={value}",
        st.one_of(
            st.sampled_from(["a.seconds", "a.resources.workers", "storage", "schedule", "a", ""]),
            st.text(max_size=12),
        ),
        st.one_of(st.text(max_size=30), SCALARS.map(lambda v: json.dumps(v, default=str))),
    ),
    max_size=3,
)


def check_cli(code: int, output: str) -> None:
    assert "Traceback" not in output, output[-3000:]
    assert code in (0, 2), (code, output[-3000:])
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    if code == 2:
        assert len(errors) == 1, output[-3000:]
    assert all(len(line) < 1200 for line in errors), max(map(len, errors))


@FUZZ
@given(text=pipelines(), overrides=OVERRIDES)
def test_generated_pipeline_files_and_overrides(text, overrides):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.yaml"
        path.write_text(text, errors="surrogatepass")
        check_cli(*invoke("validate", str(path), *overrides))


@st.composite
def records(draw) -> bytes:
    """A run record with one key (top-level or a stage's) replaced, removed or cut short."""
    data = good_record("r1")
    target = data if draw(st.booleans()) else data["stages"]["a"]
    key = draw(st.sampled_from(sorted(target) + ["extra"]))
    if draw(st.integers(0, 3)) == 0:
        target.pop(key, None)
    else:
        target[key] = draw(VALUES)
    raw = json.dumps(data, default=str).encode()  # NaN and Infinity as Python writes them
    how = draw(st.integers(0, 5))
    if how == 0:
        raw = raw[: int(draw(st.floats(0, 1)) * len(raw))]  # its length varies with the clock
    elif how == 1:
        raw = raw.replace(b"succeeded", draw(st.binary(max_size=6)), 1)
    return raw


@FUZZ
@given(raw=records())
def test_generated_run_records(raw):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "runs" / "r1").mkdir(parents=True)
        (Path(d) / "runs" / "r1" / RUN_FILE).write_bytes(raw)
        check_cli(*invoke("show", "r1", "--storage", d))
        code, output = invoke("runs", "--storage", d)
        check_cli(code, output)
        assert code == 0 and "r1" in output, output  # listed, good or damaged


def test_the_strategies_reach_hostile_numbers():
    """The generators are not toothless: they make the values that broke before."""
    seen = set()

    @settings(max_examples=200, derandomize=True, database=None)
    @given(NUMBERS)
    def draw(value):
        if isinstance(value, float) and not math.isfinite(value):
            seen.add("nonfinite")
        elif isinstance(value, bool):
            seen.add("bool")
        elif isinstance(value, int) and abs(value) >= 2**63:
            seen.add("beyond 64 bits")

    draw()
    assert seen == {"nonfinite", "bool", "beyond 64 bits"}, seen
