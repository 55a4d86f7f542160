"""Pipeline files: every kind of bad file is rejected before Ray starts, naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import spec

GOOD = """\
name: ok
storage: {storage}
stages:
  a:
    uses: test.sleep
    with: {{seconds: 0, value: 1}}
  b:
    uses: test.sleep
    needs: [a]
    resources: {{workers: 2, gpu: auto, cpus_per_worker: 0.5}}
"""


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_good_file_validates_with_typed_configs(tmp_path):
    pipeline = spec.load(write(tmp_path, GOOD.format(storage=tmp_path)))
    assert pipeline.order == ["a", "b"]
    assert pipeline.stages["b"].config.value == 1.0  # the component's default, typed
    assert pipeline.stages["b"].spec.resources.workers == 2
    assert pipeline.descendants({"a"}) == {"a", "b"}


# Each case: a pipeline text, the key path the message must name, and a word it must contain.
BAD_FILES = {
    "unknown_component": (
        "name: x\nstages:\n  a: {uses: vision.nope}\n",
        "stages.a.uses",
        "unknown component 'vision.nope'",
    ),
    "unknown_with_key": (
        "name: x\nstages:\n  a: {uses: test.sleep, with: {secnds: 1}}\n",
        "stages.a.with.secnds",
        "unknown key",
    ),
    "mistyped_with_key": (
        "name: x\nstages:\n  a: {uses: test.sleep, with: {seconds: soon}}\n",
        "stages.a.with.seconds",
        "valid number",
    ),
    "unknown_top_level_key": (
        "name: x\nstorge: /tmp\nstages:\n  a: {uses: test.sleep}\n",
        "storge",
        "expected one of",
    ),
    "unknown_stage_key": (
        "name: x\nstages:\n  a: {uses: test.sleep, need: [b]}\n",
        "stages.a.need",
        "unknown key",
    ),
    "needs_missing_stage": (
        "name: x\nstages:\n  a: {uses: test.sleep, needs: [ghost]}\n",
        "stages.a.needs.0",
        "no stage named 'ghost'",
    ),
    "cycle": (
        "name: x\nstages:\n"
        "  a: {uses: test.sleep, needs: [b]}\n  b: {uses: test.sleep, needs: [a]}\n",
        "stages.a.needs",
        "dependency cycle: a -> b -> a",
    ),
    "self_need": (
        "name: x\nstages:\n  a: {uses: test.sleep, needs: [a]}\n",
        "stages.a.needs.0",
        "cannot need itself",
    ),
    "duplicate_stage_name": (
        "name: x\nstages:\n  a: {uses: test.sleep}\n  a: {uses: test.fail}\n",
        None,
        "duplicate key 'a' at line 4",
    ),
    "bad_cron": (
        "name: x\nschedule: '61 * * * *'\nstages:\n  a: {uses: test.sleep}\n",
        "schedule",
        "cron",
    ),
    "invalid_yaml": ("name: x\nstages: [a: {uses\n", None, "invalid YAML"),
    "not_a_mapping": ("- just\n- a list\n", None, "expected a YAML mapping"),
    "missing_stages": ("name: x\n", "stages", "required key is missing"),
    "empty_stages": ("name: x\nstages: {}\n", "stages", "at least one stage"),
    "bad_gpu_value": (
        "name: x\nstages:\n  a: {uses: test.sleep, resources: {gpu: maybe}}\n",
        "stages.a.resources.gpu",
        "maybe",
    ),
    "mistyped_workers": (
        "name: x\nstages:\n  a: {uses: test.sleep, resources: {workers: two}}\n",
        "stages.a.resources.workers",
        "valid integer",
    ),
    "stage_name_with_path_separator": (
        "name: x\nstages:\n  ../evil: {uses: test.sleep}\n",
        "stages.../evil",
        "no path separators",
    ),
    "stage_name_unicode": (
        "name: x\nstages:\n  étape: {uses: test.sleep}\n",
        "stages.étape",
        "ASCII",
    ),
    "python_object_tag": (
        "name: !!python/object/apply:os.system ['echo pwned']\nstages:\n  a: {uses: test.sleep}\n",
        None,
        "invalid YAML",
    ),
    "bad_pipeline_name": (
        "name: ../up\nstages:\n  a: {uses: test.sleep}\n",
        "name",
        "pattern",
    ),
}


@pytest.mark.reliability
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_pipeline_file_names_the_key(tmp_path, case):
    text, key, words = BAD_FILES[case]
    path = write(tmp_path, text)
    with pytest.raises(spec.PipelineError) as info:
        spec.load(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    if key is not None:
        assert f": {key}:" in message, message
    assert words in message, message


@pytest.mark.reliability
def test_missing_file_and_directory_and_binary(tmp_path):
    with pytest.raises(spec.PipelineError, match="no such file"):
        spec.load(tmp_path / "absent.yaml")
    with pytest.raises(spec.PipelineError, match="is a directory"):
        spec.load(tmp_path)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"name: \xff\xfe\x00\x01")
    with pytest.raises(spec.PipelineError, match="not UTF-8"):
        spec.load(binary)


@pytest.mark.reliability
def test_yaml_alias_bomb_is_refused(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 20)]
    bomb = write(tmp_path, "\n".join(lines) + "\nname: bomb\nstages: {a: {uses: test.sleep}}\n")
    with pytest.raises(spec.PipelineError, match="YAML aliases"):
        spec.load(bomb)


@pytest.mark.reliability
def test_huge_file_is_refused(tmp_path):
    big = write(tmp_path, "name: big\n# " + "x" * (3 << 20) + "\nstages: {}\n")
    with pytest.raises(spec.PipelineError, match="limited to 1 MiB"):
        spec.load(big)


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, GOOD.format(storage=tmp_path))
    pipeline = spec.load(path, ["a.seconds=1e-3", "b.resources.workers=3", f"storage={tmp_path}/x"])
    assert pipeline.stages["a"].config.seconds == pytest.approx(1e-3)
    assert pipeline.stages["b"].spec.resources.workers == 3
    assert pipeline.storage == f"{tmp_path}/x"
    with pytest.raises(spec.PipelineError, match=r"stages\.a\.with\.seconds: .*valid number"):
        spec.load(path, ["a.seconds=soon"])
    with pytest.raises(spec.PipelineError, match=r"zz\.seconds: no stage named 'zz'"):
        spec.load(path, ["zz.seconds=1"])
    with pytest.raises(spec.PipelineError, match="an override is"):
        spec.load(path, ["a.seconds"])
    with pytest.raises(spec.PipelineError, match=r"stages\.a\.with\.nope: unknown key"):
        spec.load(path, ["a.nope=1"])


def test_cli_validate_rejects_before_ray_starts(tmp_path):
    bad = write(tmp_path, BAD_FILES["unknown_with_key"][0])
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "validate", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "stages.a.with.secnds: unknown key" in result.stderr
    good = write(tmp_path, GOOD.format(storage=tmp_path), "good.yaml")
    probe = (
        "import sys; from typer.testing import CliRunner; from pipelines.cli import app; "
        f"r = CliRunner().invoke(app, ['validate', {str(good)!r}]); "
        "print(r.output); assert r.exit_code == 0; assert 'ray' not in sys.modules, 'ray imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok, pipeline 'ok' with 2 stages" in result.stdout


def test_every_shipped_pipeline_validates():
    shipped = sorted(Path(spec.__file__).parent.glob("*.yaml"))
    assert shipped, "no pipelines shipped"
    for path in shipped:
        spec.load(path)
