"""Bounded work and checked names and numbers (issue 16, items 3, 4, 7 and 9).

- Pipeline files that are not regular files (/dev/zero, FIFOs with no writer, an endless one
  or a silent one) are read within the 1 MiB bound and never hang `validate`.
- Names are matched whole; numbers are numbers a run can use (workers, CPUs, augmentation,
  classes, seeds: bounded, finite, never a boolean); a cron that never fires is refused.
- A bad value of any size is quoted by a bounded prefix: validation errors stay short.
- YAML syntax errors and bad override values read like validation errors (`file: key path:
  reason`), and YAML 1.1 booleans (`on:`, `yes`) are names, not True.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from reliability_helpers import assert_one_line_error, invoke

pytestmark = pytest.mark.reliability


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- item 3: the 1 MiB bound for files that are not regular files -------------------------------


def test_dev_zero_is_read_within_the_bound():
    code, output = invoke("validate", "/dev/zero")
    assert_one_line_error(code, output, "/dev/zero: file holds more than 1 MiB")


def test_fifos_without_a_writer_endless_or_silent_never_hang(tmp_path):
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    # No writer at all: read as an empty file, at once.
    code, output = invoke("validate", str(fifo))
    assert_one_line_error(code, output, f"{fifo}: expected a YAML mapping")
    # A writer that never stops: cut at the bound. This process holds the FIFO open (read and
    # write, which never blocks) so the writer is there before `validate` opens it.
    held = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    stop = threading.Event()

    def endless() -> None:
        line = b"# " + b"x" * 4094 + b"\n"
        while not stop.is_set():
            try:
                os.write(held, line)
            except BlockingIOError:
                stop.wait(0.001)

    writer = threading.Thread(target=endless, daemon=True)
    writer.start()
    try:
        code, output = invoke("validate", str(fifo))
        assert_one_line_error(code, output, f"{fifo}: file holds more than 1 MiB")
    finally:
        stop.set()
        writer.join(timeout=10)
    # A writer that never writes (a terminal nobody types into): given up on after 5 s.
    while True:  # empty what the endless writer left in the pipe
        try:
            os.read(held, 1 << 20)
        except BlockingIOError:
            break
    try:
        code, output = invoke("validate", str(fifo))
        assert_one_line_error(code, output, f"{fifo}: cannot read: nothing to read for 5 s")
    finally:
        os.close(held)


# --- item 4: names and numbers -------------------------------------------------------------------

STAGE = "name: x\nstages:\n  a:\n    uses: {uses}\n    {block}\n"
PREP = "name: x\nstages:\n  prep:\n    uses: data.prepare\n    with: {with_}\n"
BAD_NAMES_AND_NUMBERS = {
    "stage_name_with_a_trailing_newline": (
        'name: x\nstages:\n  "a\\n": {uses: test.sleep}\n',
        "stages.a\\n: a stage name",
    ),
    "pipeline_name_with_a_trailing_newline": (
        'name: "x\\n"\nstages:\n  a: {uses: test.sleep}\n',
        "name: String should match pattern",
    ),
    "workers_zero": (
        STAGE.format(uses="test.sleep", block="resources: {workers: 0}"),
        "stages.a.resources.workers: Input should be greater than or equal to 1",
    ),
    "workers_negative": (
        STAGE.format(uses="test.sleep", block="resources: {workers: -3}"),
        "stages.a.resources.workers",
    ),
    "workers_true": (
        STAGE.format(uses="test.sleep", block="resources: {workers: true}"),
        "stages.a.resources.workers: Value error, expected a number, not true",
    ),
    "workers_a_million": (
        STAGE.format(uses="test.sleep", block="resources: {workers: 1000000}"),
        "less than or equal to 4096",
    ),
    "cpus_per_worker_negative": (
        STAGE.format(uses="test.sleep", block="resources: {cpus_per_worker: -1}"),
        "stages.a.resources.cpus_per_worker: Input should be greater than 0",
    ),
    "cpus_per_worker_nan": (
        STAGE.format(uses="test.sleep", block="resources: {cpus_per_worker: .nan}"),
        "cpus_per_worker: Input should be a finite number",
    ),
    "cpus_per_worker_inf": (
        STAGE.format(uses="test.sleep", block="resources: {cpus_per_worker: .inf}"),
        "cpus_per_worker: Input should be a finite number",
    ),
    "cpus_per_worker_false": (
        STAGE.format(uses="test.sleep", block="resources: {cpus_per_worker: false}"),
        "stages.a.resources.cpus_per_worker",
    ),
    "a_search_with_no_workers": (
        "name: x\nstages:\n  prep: {uses: data.prepare}\n  s:\n    uses: tune.search\n"
        "    needs: [prep]\n    resources: {workers: 0}\n"
        "    with: {space: {lr: {loguniform: [1.0e-4, 1.0e-2]}}}\n",
        "stages.s.resources.workers: Input should be greater than or equal to 1",
    ),
    "a_search_of_a_trillion_trials": (
        "name: x\nstages:\n  prep: {uses: data.prepare}\n  s:\n    uses: tune.search\n"
        "    needs: [prep]\n"
        "    with: {samples: 1000000000000, space: {lr: {loguniform: [1.0e-4, 1.0e-2]}}}\n",
        "stages.s.with.samples: Input should be less than or equal to 10000",
    ),
    "jitter_inf": (PREP.format(with_="{augment: {jitter: .inf}}"), "augment.jitter"),
    "noise_inf": (PREP.format(with_="{augment: {noise: .inf}}"), "augment.noise"),
    "jitter_huge": (PREP.format(with_="{augment: {jitter: 1.0e+308}}"), "augment.jitter"),
    "num_classes_a_trillion": (
        PREP.format(
            with_="{source: {kind: mnist_idx, images: [i], labels: [l], "
            "num_classes: 1000000000000}}"
        ),
        "stages.prep.with.source.mnist_idx.num_classes: Input should be less than or equal",
    ),
    "csv_num_classes_a_trillion": (
        PREP.format(with_="{source: {kind: csv, paths: [a.csv], num_classes: 1000000000000}}"),
        "num_classes: Input should be less than or equal to 10000",
    ),
    "an_integer_beyond_64_bits": (
        STAGE.format(uses="test.sleep", block="with: {steps: 100000000000000000000000}"),
        "stages.a.with.steps: Value error, an integer beyond 64 bits",
    ),
    "a_boolean_for_a_float": (
        STAGE.format(uses="test.sleep", block="with: {value: true}"),
        "stages.a.with.value: Value error, expected a number, not true",
    ),
    "cron_that_never_fires": (
        "name: x\nschedule: '0 0 31 2 *'\nstages:\n  a: {uses: test.sleep}\n",
        "schedule: the cron expression '0 0 31 2 *' never fires",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_NAMES_AND_NUMBERS))
def test_names_and_numbers_are_checked(tmp_path, case):
    text, words = BAD_NAMES_AND_NUMBERS[case]
    path = write(tmp_path, text)
    code, output = invoke("validate", str(path))
    assert_one_line_error(code, output, f"error: {path}: ", words)


def test_overrides_are_checked_the_same_way(tmp_path):
    path = write(tmp_path, "name: x\nstages:\n  a: {uses: test.sleep}\n")
    for override, words in {
        "a.resources.workers=0": "a.resources.workers",
        "a.resources.cpus_per_worker=nan": "finite number",
        "a.resources.cpus_per_worker=.inf": "finite number",
        "a.value=true": "expected a number, not true",
        "schedule=0 0 30 2 *": "never fires",
    }.items():
        code, output = invoke("validate", str(path), override)
        assert_one_line_error(code, output, words)


# --- item 7: bad values of any size are quoted by a bounded prefix ---------------------------


def test_huge_bad_values_give_short_errors(tmp_path):
    huge = "v" * 900_000
    path = write(
        tmp_path, f"name: x\nstages:\n  a: {{uses: test.sleep, with: {{seconds: {huge}}}}}\n"
    )
    code, output = invoke("validate", str(path))
    line = assert_one_line_error(code, output, "stages.a.with.seconds: Input should be a valid")
    assert len(output) < 2000 and "more characters" in line, len(output)
    name = "s" * 1000  # (YAML itself refuses plain keys over 1024 characters)
    path = write(tmp_path, f"name: x\nstages:\n  {name}: {{uses: test.sleep}}\n", "name.yaml")
    code, output = invoke("validate", str(path))
    assert_one_line_error(code, output, "a stage name")
    assert len(output) < 2000, len(output)
    # One override of half a megabyte; all the overrides of a command are bounded like a file.
    path = write(tmp_path, "name: x\nstages:\n  a: {uses: test.sleep}\n", "small.yaml")
    code, output = invoke("validate", str(path), f"a.seconds={huge[:500_000]}")
    assert_one_line_error(code, output, "stages.a.with.seconds")
    assert len(output) < 2000, len(output)
    code, output = invoke("validate", str(path), f"a.seconds={huge}", f"a.value={huge}")
    assert_one_line_error(
        code, output, "overrides: 1,800,018 bytes in all; overrides are limited to 1 MiB"
    )


# --- item 9: YAML errors read like validation errors; YAML 1.1 booleans are names ------------

YAML_ERRORS = {
    "unclosed_flow_sequence": (
        "name: x\nstages:\n  a:\n    uses: test.sleep\n    with: {seconds: [1, 2}\n",
        "stages.a.with: invalid YAML at line 5, column 26:",
    ),
    "a_colon_in_a_plain_value": (
        "name: x\nstages:\n  a:\n    uses: test.sleep\n    with:\n      seconds: 1: 2\n",
        "stages.a.with.seconds: invalid YAML at line 6, column 17: mapping values are not",
    ),
    "a_tab_for_indentation": (
        "name: x\nstages:\n  a: {uses: test.sleep}\n\tb: 1\n",
        "stages.a: invalid YAML at line 4, column 1:",
    ),
    "an_unterminated_string": (
        'name: x\nstages:\n  a: {uses: test.sleep}\n  b: {uses: "test.sleep}\n',
        "stages.b: invalid YAML at line 5, column 1:",
    ),
    "a_duplicate_stage": (
        "name: x\nstages:\n  a: {uses: test.sleep}\n  a: {uses: test.fail}\n",
        "stages.a: invalid YAML at line 4, column 3: duplicate key 'a' at line 4",
    ),
}


@pytest.mark.parametrize("case", sorted(YAML_ERRORS))
def test_yaml_syntax_errors_name_the_file_and_key(tmp_path, case):
    text, words = YAML_ERRORS[case]
    path = write(tmp_path, text)
    code, output = invoke("validate", str(path))
    assert_one_line_error(code, output, f"error: {path}: {words}")


def test_bad_override_values_name_the_file_and_key(tmp_path):
    path = write(tmp_path, "name: x\nstages:\n  a: {uses: test.sleep}\n")
    for override, words in {
        "a.seconds=[1, 2": "a.seconds: invalid YAML at line 1, column ",
        "a.seconds={x: }}": "a.seconds: invalid YAML at line 1, column ",
        'a.seconds="open': "a.seconds: invalid YAML at line 1, column ",
        "a.seconds=!!python/name:os.system": "a.seconds: invalid YAML at line 1, column ",
        "a.seconds=*nothing": "a.seconds: invalid YAML at line 1, column ",
    }.items():
        code, output = invoke("validate", str(path), override)
        assert_one_line_error(code, output, f"error: {path}: {words}")


def test_yaml_11_booleans_are_names(tmp_path):
    text = (
        "name: x\nstages:\n  on: {uses: test.sleep}\n  yes: {uses: test.sleep, needs: [on]}\n"
        "  off: {uses: test.sleep, needs: [yes, on], resources: {gpu: false}}\n"
    )
    code, output = invoke("validate", str(write(tmp_path, text)))
    assert code == 0, output
    assert output.splitlines()[1:] == [
        "  on: test.sleep",
        "  yes: test.sleep <- on",
        "  off: test.sleep <- yes, on",
    ], output
    path = write(tmp_path, "name: x\nstages:\n  on: {uses: test.sleep, with: {secnds: 1}}\n")
    code, output = invoke("validate", str(path))
    assert_one_line_error(code, output, f"{path}: stages.on.with.secnds: unknown key")
    path = write(tmp_path, "name: x\nstages:\n  1: {uses: test.sleep}\n")
    code, output = invoke("validate", str(path))
    assert_one_line_error(code, output, f"{path}: stages.1: a stage name")
    # A boolean setting still takes yes and no; a free-form one keeps the word.
    path = write(
        tmp_path,
        "name: x\nstages:\n  a: {uses: data.prepare, with: {clean: {drop_duplicates: no}}}\n",
    )
    from pipelines import spec

    assert spec.load(path).stages["a"].config.clean.drop_duplicates is False
    assert json.loads(json.dumps(spec.parse_yaml("a: [yes, on, y]", "s"))) == {
        "a": ["yes", "on", "y"]
    }


def test_the_resource_wait_from_the_environment_is_checked(monkeypatch):
    """RAYPIPE_RESOURCE_WAIT_S is a number from the outside like any other: a word, NaN, an
    infinity, zero or a negative is refused naming the variable, not passed on to Ray Train."""
    from components import training

    monkeypatch.delenv("RAYPIPE_RESOURCE_WAIT_S", raising=False)
    assert training.resource_wait_s() == training.RESOURCE_WAIT_S
    monkeypatch.setenv("RAYPIPE_RESOURCE_WAIT_S", "30")
    assert training.resource_wait_s() == 30.0
    for bad in ("abc", "nan", "inf", "-inf", "0", "-5", "", "1" * 400):
        monkeypatch.setenv("RAYPIPE_RESOURCE_WAIT_S", bad)
        with pytest.raises(
            ValueError, match="^RAYPIPE_RESOURCE_WAIT_S=.*: a number of seconds"
        ) as e:
            training.resource_wait_s()
        assert len(str(e.value)) < 200
