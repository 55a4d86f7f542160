"""Bad input, as a table: each kind gets a clear error that names the file, key or row, or a
quarantine with its reason, never a traceback from deep inside a library; and what is complete
is never lost.

Data inputs run as stages of one pipeline (one engine run on the session's Ray: each stage
fails or succeeds on its own, so a good stage beside the bad ones completes). Pipeline files go
through `raypipe validate`. More kinds live beside the data stage's own tests
(tests/data/test_quarantine.py) and the pipeline-file tests (tests/engine/test_spec.py).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipelines import engine, spec
from pipelines.cli import app

pytestmark = pytest.mark.reliability

# Exception types of raypipe's own, or the builtin ones it raises with a message of its own;
# a library's type (ArrowInvalid, ParserError, UnidentifiedImageError, ...) means it leaked.
OURS = ("SourceError", "RejectedRowsError", "ValueError")


def png_bytes(h: int, w: int, seed: int, mode: str = "L") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (h, w) if mode == "L" else (h, w, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(h: int, w: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").save(buf, "JPEG")
    return buf.getvalue()


def image_folder(root: Path, files: dict[str, bytes]) -> str:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return str(root)


def make_inputs(d: Path) -> dict[str, tuple[dict, str, str]]:
    """{stage: (data.prepare source, expected outcome, words the error or quarantine holds)}.

    ``outcome`` is ``failed`` (the words are in the stage's one-line error), ``quarantined``
    (the stage succeeds; the words are a quarantine reason and the file's path is listed) or
    ``kept`` (the stage succeeds with every row; the words are ``key=value`` of dataset.json).
    """
    (d / "empty.csv").write_text("x,y,label\n")
    (d / "zero.csv").write_bytes(b"")
    (d / "zero-images.idx").write_bytes(b"")
    (d / "labels.idx").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 2, 1, 2]))
    (d / "png-really.csv").write_bytes(png_bytes(8, 8, 0))
    (d / "csv-really.idx").write_text("x,label\n1,0\n")
    (d / "ragged.csv").write_text("x,label\n1,0\n2,1,7,7\n3,0\n")
    (d / "one-class.csv").write_text("x,label\n" + "".join(f"{i},0\n" for i in range(12)))
    for name, (h, w) in {"a": (8, 8), "b": (12, 12)}.items():
        header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (2, h, w))
        (d / f"{name}-images.idx").write_bytes(header + bytes(2 * h * w))
    mixed = {
        f"c{k}/m{i}.png": png_bytes(5 + 3 * i, 9 + k, 20 + 10 * k + i)
        for k in range(2)
        for i in range(4)
    }
    mixed["c1/really-a-jpeg.png"] = jpeg_bytes(16, 16, 99)
    good = {f"c{k}/g{i}.png": png_bytes(8, 8, 10 * k + i) for k in range(2) for i in range(4)}
    cases = {
        "empty_csv": (
            {"kind": "csv", "paths": [str(d / "empty.csv")]},
            "failed",
            f"{d / 'empty.csv'}: no rows to read",
        ),
        "zero_byte_csv": (
            {"kind": "csv", "paths": [str(d / "zero.csv")]},
            "failed",
            f"{d / 'zero.csv'}: cannot read a CSV header",
        ),
        "zero_byte_idx": (
            {
                "kind": "mnist_idx",
                "images": [str(d / "zero-images.idx")],
                "labels": [str(d / "labels.idx")],
            },
            "failed",
            f"{d / 'zero-images.idx'}: not an IDX file",
        ),
        "empty_image_folder": (
            {
                "kind": "image_folder",
                "root": image_folder(d / "empty-folder", {}) + "",
                "size": [8, 8],
            },
            "failed",
            "no class sub-folders",
        ),
        "png_named_csv": (
            {"kind": "csv", "paths": [str(d / "png-really.csv")]},
            "failed",
            f"{d / 'png-really.csv'}: cannot read a CSV header",
        ),
        "csv_named_idx": (
            {
                "kind": "mnist_idx",
                "images": [str(d / "csv-really.idx")],
                "labels": [str(d / "labels.idx")],
            },
            "failed",
            f"{d / 'csv-really.idx'}: not an IDX file",
        ),
        "ragged_csv_row": (
            {"kind": "csv", "paths": [str(d / "ragged.csv")]},
            "failed",
            f"{d / 'ragged.csv'}",
        ),
        "idx_mixed_shapes": (
            {
                "kind": "mnist_idx",
                "images": [str(d / "a-images.idx"), str(d / "b-images.idx")],
                "labels": [str(d / "labels.idx"), str(d / "labels.idx")],
            },
            "failed",
            f"{d / 'b-images.idx'}: image shape",
        ),
        "images_of_mixed_sizes": (
            {
                "kind": "image_folder",
                "root": image_folder(d / "mixed", mixed),
                "size": [8, 8],
                "channels": 1,
            },
            "kept",
            "image_shape=[1, 8, 8]",
        ),
        "single_class": (
            {"kind": "csv", "paths": [str(d / "one-class.csv")]},
            "kept",
            "num_classes=1",
        ),
        "zero_byte_png": (
            {
                "kind": "image_folder",
                "root": image_folder(d / "zero-png", {**good, "c1/zero.png": b""}),
                "size": [8, 8],
                "channels": 1,
            },
            "quarantined",
            "undecodable",
        ),
        "text_named_png": (
            {
                "kind": "image_folder",
                "root": image_folder(d / "text-png", {**good, "c0/fake.png": b"<html>no</html>"}),
                "size": [8, 8],
                "channels": 1,
            },
            "quarantined",
            "undecodable",
        ),
    }
    (d / "empty-folder").mkdir(exist_ok=True)
    return cases


def test_bad_data_inputs_fail_clearly_or_are_quarantined(ray_local, tmp_path):
    cases = make_inputs(tmp_path)
    stages = "".join(
        f"  {name}:\n    uses: data.prepare\n"
        f"    with: {{source: {json.dumps(source)}, split: {{val: 0.0, test: 0.0}},"
        " clean: {max_rejected_fraction: 0.5}}\n"
        for name, (source, _, _) in cases.items()
    )
    # A good stage beside the bad ones, and one that depends on a bad one.
    stages += (
        "  good:\n    uses: data.prepare\n    with: {split: {val: 0.0, test: 0.0}}\n"
        "  after_bad:\n    uses: test.sleep\n    needs: [empty_csv]\n"
    )
    path = tmp_path / "bad-inputs.yaml"
    path.write_text(f"name: bad-inputs\nstorage: {tmp_path / 'store'}\nstages:\n{stages}")
    record = engine.run_pipeline(spec.load(path), printer=lambda _: None)

    assert record.status == "failed"
    outcome = {}
    for name, (_, expected, words) in cases.items():
        st = record.stages[name]
        if expected == "failed":
            error = st.error or ""
            outcome[name] = (st.status, error)
            assert st.status == "failed", (name, st.status)
            assert words in error, (name, error)
            assert "\n" not in error and error.split(":")[0] in OURS, (name, error)
        elif expected == "kept":
            assert st.status == "succeeded", (name, st.error)
            dataset = json.loads((Path(st.artifact) / "dataset.json").read_text())
            key, value = words.split("=")
            assert json.dumps(dataset[key]) == value, (name, dataset[key])
            assert dataset["accounting"]["quarantined"] == 0, dataset["accounting"]
        else:
            assert st.status == "succeeded", (name, st.error)
            dataset = json.loads((Path(st.artifact) / "dataset.json").read_text())
            assert dataset["accounting"]["quarantined_by_reason"].get(words) == 1, dataset
            import pandas as pd

            rows = pd.concat(
                pd.read_parquet(Path(st.artifact) / s["path"])
                for s in dataset["quarantine"]["shards"]
            )
            assert rows["reason"].tolist() == [words] and Path(rows["source"][0]).exists()
    assert record.stages["good"].status == "succeeded"
    assert record.stages["after_bad"].status == "skipped"
    # The good stage's artifact is published and whole although its neighbours failed.
    from pipelines.store import Store

    Store(str(tmp_path / "store")).verify("data.prepare", record.stages["good"].cache_key)


# Pipeline files: each a one-line error naming the file (and key), exit code 2, no traceback.
def _bomb() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 20)]
    return "\n".join(lines) + "\nname: bomb\nstages: {a: {uses: test.sleep}}\n"


def _quiet_bomb() -> str:
    """2**40 values from 80 aliases (under the alias limit), in a free-form config mapping."""
    levels = "".join(f"        l{i}: &a{i} [*a{i - 1}, *a{i - 1}]\n" for i in range(1, 41))
    return (
        "name: bomb\nstages:\n  a:\n    uses: rl.ddpg\n    with:\n      env_config:\n"
        f"        l0: &a0 [x, x]\n{levels}"
    )


PIPELINE_FILES = {
    "yaml_bomb": (_bomb(), "YAML aliases"),
    "yaml_bomb_under_the_alias_limit": (_quiet_bomb(), "expands to"),
    "deeply_nested_yaml": (
        "name: x\nstages:\n  a: {uses: rl.ddpg, with: {env_config: {x: "
        + "[" * 5000
        + "]" * 5000
        + "}}}\n",
        "nested more than",
    ),
    "several_megabytes": (
        "name: big\nstages:\n  a: {uses: test.sleep}\n" + "# padding\n" * 600_000,
        "limited to 1 MiB",
    ),
    "unicode_stage_name": (
        "name: x\nstages:\n  日本語: {uses: test.sleep}\n",
        "stages.日本語: a stage name is ASCII",
    ),
    "slash_in_stage_name": (
        "name: x\nstages:\n  a/b: {uses: test.sleep}\n",
        "stages.a/b: a stage name",
    ),
    "backslash_in_stage_name": (
        "name: x\nstages:\n  'a\\\\b': {uses: test.sleep}\n",
        "no path separators",
    ),
    "absolute_stage_name": (
        "name: x\nstages:\n  /etc/passwd: {uses: test.sleep}\n",
        "no path separators",
    ),
    "nul_in_stage_name": ('name: x\nstages:\n  "a\\0b": {uses: test.sleep}\n', "a stage name"),
    "right_to_left_override": (
        'name: x\nstages:\n  "a\\u202eb": {uses: test.sleep}\n',
        "a stage name",
    ),
    "unicode_pipeline_name": ("name: пайплайн\nstages:\n  a: {uses: test.sleep}\n", "name:"),
    "dotdot_in_needs": (
        "name: x\nstages:\n  a: {uses: test.sleep, needs: [../a]}\n",
        "stages.a.needs.0: no stage named '../a'",
    ),
}


@pytest.mark.parametrize("case", sorted(PIPELINE_FILES))
def test_bad_pipeline_file_is_one_clear_line(tmp_path, case):
    text, words = PIPELINE_FILES[case]
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    message = result.output.strip()
    assert "Traceback" not in message and len(message.splitlines()) == 1, message
    assert message.startswith(f"error: {path}") or str(path) in message, message
    assert words in message, message
