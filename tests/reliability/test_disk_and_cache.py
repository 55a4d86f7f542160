"""The disk filling up while shards are written, and stale cache entries.

Disk full: the storage root lies on a real, small filesystem (a tmpfs, mounted when this
process may mount one; skipped otherwise), nearly filled by a ballast file. The stage fails
with an error naming the shard and the cause, nothing partial is published, and the next run
succeeds once the ballast is gone.

Stale cache: a published data artifact deleted or tampered with is detected, recomputed to the
same bytes, and (its content digest unchanged) its dependents stay cached.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from reliability_helpers import tmpfs

from pipelines import engine, spec
from pipelines.store import Store

pytestmark = pytest.mark.reliability

DISK_BYTES = 4 << 20
LEFT_FREE = 96 << 10  # room for the run record, not for the shards (~1 MB here)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs at ``tmp_path/disk``; unmounted at the end."""
    mount = tmp_path / "disk"
    mount.mkdir()
    with tmpfs(mount, f"size={DISK_BYTES},mode=0755", "raypipe-full"):
        yield mount


def fill(disk: Path, leave: int) -> Path:
    """Fills ``disk`` up to ``leave`` free bytes with a ballast file."""
    ballast = disk / "ballast"
    stat = os.statvfs(disk)
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return ballast


# `after` stands for any stage that consumes the shards (a trainer, in a real pipeline): a
# second data stage ordered after the first is the cheapest one that accepts a data input.
PREPARE = """\
  prepare:
    uses: data.prepare
    with: {augment: {copies: 2, rotate: 10, seed: 0}, rows_per_shard: 1000}
  after:
    uses: data.prepare
    needs: [prepare]
    with: {split: {val: 0.0, test: 0.0}}
"""


def pipeline(tmp_path: Path, storage: Path, stages: str = PREPARE, name: str = "disk"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nstorage: {storage}\ntracking: sqlite:///{tmp_path}/mlflow.db\n"
        f"stages:\n{stages}"
    )
    return spec.load(path)


def test_disk_full_while_writing_shards(ray_local, tmp_path, small_disk):
    storage = small_disk / "store"
    ballast = fill(small_disk, LEFT_FREE)
    lines: list[str] = []
    record = engine.run_pipeline(pipeline(tmp_path, storage), printer=lines.append)

    assert record.status == "failed"
    st = record.stages["prepare"]
    assert st.status == "failed" and record.stages["after"].status == "skipped"
    # One clear line: the cause and the file it could not write.
    assert "No space left on device" in st.error, st.error
    assert "cannot write shard" in st.error and ".parquet" in st.error, st.error
    assert "\n" not in st.error
    # Nothing partial: no artifact, no leftover temporary output.
    artifacts = storage / "artifacts"
    assert not (artifacts / "data.prepare").exists()
    assert not [p for p in (artifacts / ".tmp").iterdir()], "partial output left behind"
    saved = json.loads((storage / "runs" / record.run_id / "run.json").read_text())
    assert saved["stages"]["prepare"]["error"] == st.error

    ballast.unlink()  # room again
    again = engine.run_pipeline(pipeline(tmp_path, storage), printer=lines.append)
    assert again.ok, again.error
    Store(str(storage)).verify("data.prepare", again.stages["prepare"].cache_key)


STALE = """\
  prepare:
    uses: data.prepare
    with: {split: {val: 0.1, test: 0.1}}
  after:
    uses: data.prepare
    needs: [prepare]
    with: {split: {val: 0.0, test: 0.0}}
"""


@pytest.mark.parametrize("damage", ["deleted", "tampered"])
def test_stale_data_artifact_is_recomputed_and_dependents_stay_cached(ray_local, tmp_path, damage):
    storage = tmp_path / "store"
    first = engine.run_pipeline(pipeline(tmp_path, storage, STALE, "stale"), printer=lambda _: None)
    assert first.ok, first.error
    art = Path(first.stages["prepare"].artifact)
    shard = sorted((art / "train").glob("*.parquet"))[0]
    original = shard.read_bytes()
    if damage == "deleted":
        shutil.rmtree(art)
    else:  # same size, one byte flipped: only the sha256 can tell
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    lines: list[str] = []
    again = engine.run_pipeline(pipeline(tmp_path, storage, STALE, "stale"), printer=lines.append)
    assert again.ok, again.error
    prep = again.stages["prepare"]
    assert not prep.cache_hit
    if damage == "tampered":
        assert "does not match its sha256" in prep.recomputed_because
        assert any("cached artifact is broken" in line for line in lines)
    # Recomputed to the very same shards: same content digest, so the dependent is a cache hit.
    assert prep.cache_key == first.stages["prepare"].cache_key
    assert again.stages["after"].cache_hit, "an identical recompute invalidated a dependent"
    assert (Path(prep.artifact) / shard.relative_to(art)).read_bytes() == original
    Store(str(storage)).verify("data.prepare", prep.cache_key)
