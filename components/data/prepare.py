"""``data.prepare``: sources -> cleaning + quarantine -> split -> normalization -> augmentation
-> Parquet shards and ``dataset.json``.

How the work runs on Ray, and why the output never depends on it:

1. **read** (tasks, one per unit of the source): decode and check every row; kept rows stay in
   the object store (spilled to disk when it is full), the driver gets labels, content hashes
   and rejects only.
2. **dedup + split** (driver, a few arrays of one entry per row): exact duplicates by content
   hash, then a seeded split stratified by label over *distinct* contents, so no duplicate
   crosses splits.
3. **statistics** (tasks): exact per-channel sums over the train split's originals; exact
   sums add up to the same bits however the rows were partitioned.
4. **write** (tasks, one per output shard): gather the shard's originals, augment (seeded by
   row id and copy number), normalize, encode Parquet with pinned options; the stage writes
   the returned bytes into its output directory (see ``_write_shard`` for why not the task).

Rows keep their source order in every split (trainers shuffle); a train original is followed
by its augmented copies. ``chunk_rows`` and ``tasks`` change how the work is cut, never a byte
of output: the tests check this.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from components.api import Component, StageContext
from components.data.config import PrepareConfig

SPLITS = ("train", "val", "test")
DATASET_FILE = "dataset.json"
FORMAT = "raypipe.dataset/1"


class RejectedRowsError(ValueError):
    """More rows were quarantined than ``clean.max_rejected_fraction`` allows."""


class Prepare(Component):
    """Cleans, splits, normalizes and augments a source into Parquet shards (see module doc)."""

    version = "2"  # 2: regression targets, imputation, category levels; CSV read in pieces
    Config = PrepareConfig
    produces = "dataset"  # dataset/image or dataset/tabular: see artifact_kind
    resources_affect_output = False

    def source_paths(self, config: PrepareConfig) -> list[str]:
        return source_paths(config.source)

    def run(self, ctx: StageContext, config: PrepareConfig) -> dict[str, Any]:
        return prepare(config, ctx.out_dir, report=ctx.report)

    def artifact_kind(self, config: PrepareConfig, ctx: StageContext) -> str:
        """``dataset/image`` or ``dataset/tabular``, as the source turned out."""
        kind = json.loads((ctx.out_dir / DATASET_FILE).read_text())["kind"]
        return f"dataset/{kind}"


def source_paths(source: Any) -> list[str]:
    """The files and folders a source reads (none for the bundled digits and diabetes)."""
    if getattr(source, "package", None):
        try:
            return source.files()
        except ModuleNotFoundError:
            return list(source.paths)  # the stage itself says the package is missing
    paths = [getattr(source, name, None) for name in ("images", "labels", "paths", "root")]
    return [p for group in paths if group for p in ([group] if isinstance(group, str) else group)]


def prepare(
    config: PrepareConfig,
    out_dir: Path,
    report: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Runs the whole stage into ``out_dir``; returns its metrics.

    Raises:
        SourceError: the source cannot be read at all (the message names the path).
        RejectedRowsError: too many rows were quarantined (the message gives counts by reason).
    """
    import numpy as np
    import ray

    from components.data import normalization, sources
    from components.data.shards import shard_name, write_file

    if not ray.is_initialized():
        ray.init()
    started = time.time()
    out_dir = Path(out_dir)
    report = report or (lambda **_: None)
    limit = config.tasks or max(1, int(ray.cluster_resources().get("CPU", 1)))

    info, units = sources.plan(config.source, config.chunk_rows)
    where = ", ".join(source_paths(config.source)) or config.source.kind
    if not units:
        raise sources.SourceError(f"{where}: no rows to read (the source is empty)")

    # 1. read -----------------------------------------------------------------------------------
    read_task = ray.remote(num_returns=2, num_cpus=1)(_read_unit)
    source_ref = ray.put(config.source)
    done = Counter()

    def count(key: str, rows: int) -> None:
        done[key] += rows
        report(rows_done=done[key], phase=key)

    def read_done(meta: Any) -> None:
        if isinstance(meta, sources.SourceError):
            raise meta  # a task found the source unreadable: the stage fails with its message
        count("read", meta.rows_in)

    read = _run_tasks(
        lambda u: read_task.remote(source_ref, info, u),
        units,
        limit,
        on_done=read_done,
        first_only=True,
    )
    metas = [meta for meta, _ in read]
    data_refs = [ref for _, ref in read]

    phases = {"read": time.time() - started}
    # 2. dedup + split --------------------------------------------------------------------------
    rows = _kept_rows(metas)
    rejects = [r for m in metas for r in m.rejects]
    first, inverse = _first_occurrence(rows["hash"])
    is_dup = np.arange(len(first[inverse])) != first[inverse]
    duplicates = []
    if config.clean.drop_duplicates:
        for i in np.flatnonzero(is_dup):
            src, idx = _location(metas, rows, i)
            orig = first[inverse[i]]
            osrc, oidx = _location(metas, rows, orig)
            same = "" if rows["label"][i] == rows["label"][orig] else " (different label)"
            detail = f"same content as {osrc}:{oidx}{same}"
            duplicates.append(
                sources.Reject(src, idx, sources.DUPLICATE, detail, str(rows["label"][i]))
            )
        keep = ~is_dup
        rows = {k: v[keep] for k, v in rows.items()}
        inverse = np.arange(keep.sum())  # every kept row is its own group now
        first = inverse
    rows_in = sum(m.rows_in for m in metas)
    if rows_in == 0:
        raise sources.SourceError(f"{where}: no rows to read (the source is empty)")
    by_reason = dict(sorted(Counter(r.reason for r in rejects).items()))
    _check_rejected(rows_in, rejects, by_reason, len(duplicates), config)
    if len(rows["label"]) == 0:
        raise RejectedRowsError(f"data.prepare: no rows left of {rows_in} input rows")
    regression = info.task == "regression"
    # bounded: labels were checked against num_classes (or MAX_CLASSES) as they were read
    num_classes = None if regression else info.num_classes or int(rows["label"].max()) + 1
    strata = np.zeros(len(rows["label"]), np.int64) if regression else rows["label"]
    split_of = _split(strata, first, inverse, config)

    phases["dedup_split"] = time.time() - started - sum(phases.values())
    # 3. statistics over the train originals ----------------------------------------------------
    train = split_of == 0
    jobs = [(c, rows["local"][train & (rows["chunk"] == c)]) for c in range(len(data_refs))]
    jobs = [(c, local) for c, local in jobs if len(local)]
    if not jobs:
        raise RejectedRowsError("data.prepare: the train split is empty; lower split.val/test")
    table: dict[str, Any] = {}
    if info.kind == "image":
        partial_task = ray.remote(num_cpus=1)(_partial_unit)
        parts = _run_tasks(
            lambda job: partial_task.remote(info, job[1], data_refs[job[0]]), jobs, limit
        )
        total = sum(parts[1:], parts[0])
        stats = normalization.finish(total, config.normalize.method, info.pixel_scale)
        stats["pixel_scale"] = info.pixel_scale
    else:
        stats, table = _table_statistics(info, config, jobs, data_refs, limit, where)
        stats["pixel_scale"] = None
        if regression:
            target = normalization.finish(
                normalization.table_partial([rows["label"][train]]), "standard"
            )
            mean, std = target["mean"][0], target["std"][0]
            table["target_normalization"] = {"mean": mean, "std": std, "scale": std or 1.0}

    phases["statistics"] = time.time() - started - sum(phases.values())
    # 4. write shards ---------------------------------------------------------------------------
    copies = config.augment.copies
    if info.kind == "tabular" and config.augment.jitter == 0:
        copies = 0
    # The write tasks run wherever Ray finds a CPU. out_dir is local to the stage's node (for
    # an s3:// or file:// store it is the node's download cache, published by upload
    # afterwards): a task on this node writes its shard there itself, and one on another
    # node sends the encoded shard back for this process to write, so its bytes cross the
    # object store once, like the rows that went into it. Pinning the tasks to this node
    # instead would hang for ever when the node has no free CPU (a 0-CPU stage task on a
    # num-cpus=0 head, or a 1-CPU head already holding a job driver).
    write_task = ray.remote(num_cpus=1)(_write_shard)
    # (A Ray client's process is on no node of the cluster: every shard comes back to it.)
    client = ray.util.client.ray.is_connected()
    here = (None if client else ray.get_runtime_context().get_node_id(), str(out_dir))

    imputed: Counter = Counter()

    def write(value: dict) -> dict:
        if "data" in value:  # encoded on another node
            value.update(write_file(value.pop("data"), out_dir / value["path"]))
        imputed.update(value.pop("imputed", {}))
        count("write", value["rows"])
        return value

    shard_specs = []
    for s, split in enumerate(SPLITS):
        pick = np.flatnonzero(split_of == s)
        k = copies + 1 if split == "train" else 1
        order = np.repeat(pick, k)
        copy = np.tile(np.arange(k, dtype=np.int32), len(pick))
        for j, lo in enumerate(range(0, len(order), config.rows_per_shard)):
            sel = order[lo : lo + config.rows_per_shard]
            shard_specs.append(
                {
                    "split": split,
                    "path": shard_name(split, j),
                    "chunk": rows["chunk"][sel],
                    "local": rows["local"][sel],
                    "row_id": rows["row_id"][sel],
                    "label": rows["label"][sel],
                    "copy": copy[lo : lo + config.rows_per_shard],
                }
            )
    job_args = (info, stats, config.augment, table.get("fill", {}), here)
    shards = _run_tasks(
        lambda spec: write_task.remote(
            spec, *job_args, *[data_refs[c] for c in np.unique(spec["chunk"])]
        ),
        shard_specs,
        limit,
        on_done=write,
    )
    data_refs.clear()  # frees the object store before the (small) quarantine write

    phases["write"] = time.time() - started - sum(phases.values())
    quarantine = _write_quarantine(out_dir, rejects + duplicates, config.rows_per_shard)
    kept = int(len(rows["label"]))
    rows_out = {split: sum(s["rows"] for s in shards if s["split"] == split) for split in SPLITS}
    originals = {split: int((split_of == s).sum()) for s, split in enumerate(SPLITS)}
    accounting = {
        "rows_in": rows_in,
        "kept": kept,
        "quarantined": len(rejects),
        "quarantined_by_reason": by_reason,
        "duplicates_removed": len(duplicates),
        "duplicates_kept": int(is_dup.sum()) if not config.clean.drop_duplicates else 0,
        "originals_by_split": originals,
        "augmented_rows": rows_out["train"] - originals["train"],
        "rows_out_by_split": rows_out,
        "balanced": rows_in == kept + len(rejects) + len(duplicates),
    }
    if info.kind == "tabular" and info.impute != "quarantine":
        accounting["imputed_by_column"] = {c: imputed[c] for c in table["fill"]}
    assert accounting["balanced"], accounting  # the reads above count every row exactly once
    dataset = _describe(config, info, num_classes, stats, accounting, shards, quarantine, table)
    (out_dir / DATASET_FILE).write_text(json.dumps(dataset, indent=2, sort_keys=True) + "\n")
    seconds = time.time() - started
    return {
        "data/rows_in": rows_in,
        "data/kept": kept,
        "data/quarantined": len(rejects),
        "data/duplicates_removed": len(duplicates),
        "train/rows": rows_out["train"],
        "val/rows": rows_out["val"],
        "test/rows": rows_out["test"],
        "data/seconds": seconds,
        "data/rows_per_s": rows_in / seconds if seconds > 0 else 0.0,
        **{f"data/{name}_seconds": round(t, 3) for name, t in phases.items()},
    }


# -- task bodies (plain functions; wrapped with ray.remote at run time) ------------------------


def _read_unit(source: Any, info: Any, unit: Any) -> tuple[Any, Any]:
    """Reads one unit; a source it finds unreadable is returned, not raised: the stage fails
    with its one-line message, and Ray prints no worker traceback for an expected error."""
    from components.data import sources

    try:
        chunk = sources.read(source, info, unit)
    except sources.SourceError as e:
        return e, None
    return chunk.meta(), chunk.data


def _partial_unit(info: Any, local: Any, data: Any) -> Any:
    """Exact per-channel sums over some train original images of one chunk."""
    from components.data import normalization

    return normalization.image_partial(data[local])


def _table_partial(info: Any, local: Any, data: Any, what: str, arg: Any = None) -> Any:
    """One task of the table statistics, over some train originals of one chunk.

    ``what``: ``count`` (missing values per numeric column, each categorical column's level
    counts, and exact sums where nothing is missing), ``values`` (the observed values of the
    columns ``arg``: for a median) or ``sums`` (exact sums once missing values are filled with
    ``arg``, a fill per numeric column).
    """
    from collections import Counter

    import numpy as np

    from components.data import normalization
    from components.data.table import fill_numeric

    table = data.take(local)
    x = (
        np.stack(
            [table.column(c).to_numpy().astype(np.float64) for c in info.feature_columns], axis=1
        )
        if info.feature_columns
        else np.zeros((table.num_rows, 0))
    )
    if what == "values":
        return {c: x[:, info.feature_columns.index(c)] for c in arg}
    if what == "sums":
        x = fill_numeric(x, arg)
        return normalization.table_partial([x[:, j] for j in range(x.shape[1])])
    missing = np.isnan(x).sum(axis=0)
    return {
        "missing": missing.tolist(),
        "levels": {c: Counter(table.column(c).to_pylist()) for c in info.categorical_columns},
        "sums": None
        if missing.any()
        else normalization.table_partial([x[:, j] for j in range(x.shape[1])]),
    }


def _table_statistics(
    info: Any, config: PrepareConfig, jobs: list, data_refs: list, limit: int, where: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Normalization statistics of a table's numeric features over the train originals, what
    fills a missing value (the source's ``impute``), and every categorical column's levels.

    A first pass counts; only where the source imputes and values are missing, a second pass
    gathers the columns' observed values for their median or mode, and a third sums again with
    them filled in (the statistics describe what the shards hold).

    Raises:
        SourceError: a column has no value to impute from, or more levels than ``max_levels``.
    """
    from collections import Counter

    import numpy as np
    import ray

    from components.data import normalization, sources

    task = ray.remote(num_cpus=1)(_table_partial)

    def run(what: str, arg: Any = None) -> list[Any]:
        return _run_tasks(
            lambda job: task.remote(info, job[1], data_refs[job[0]], what, arg), jobs, limit
        )

    counted = run("count")
    missing = np.sum([part["missing"] for part in counted], axis=0)
    levels: dict[str, Counter] = {c: Counter() for c in info.categorical_columns}
    for part in counted:
        for c, counts in part["levels"].items():
            levels[c].update(counts)
    for c, counts in levels.items():
        if len(counts) > info.max_levels:
            raise sources.SourceError(
                f"{where}: categorical column {c!r} has {len(counts)} distinct values in the "
                f"train split, more than source.max_levels={info.max_levels}: an identifier is "
                "not a category (leave it out of the features) or raise max_levels"
            )
    fill: dict[str, Any] = {}
    if info.impute != "quarantine":
        need = [c for c, n in zip(info.feature_columns, missing, strict=True) if n]
        gathered = run("values", need) if need else []
        for c in need:
            values = np.concatenate([part[c] for part in gathered])
            values = values[~np.isnan(values)]
            if not len(values):
                raise sources.SourceError(
                    f"{where}: column {c!r} has no value in the train split to impute from "
                    "(every value is missing): leave it out of the features"
                )
            fill[c] = float(np.median(values)) if info.impute == "median" else _mode(values)
        for c, counts in levels.items():
            if counts.get(None):
                present = {v: n for v, n in counts.items() if v is not None}
                if not present:
                    raise sources.SourceError(
                        f"{where}: column {c!r} has no value in the train split to impute from "
                        "(every value is missing): leave it out of the features"
                    )
                fill[c] = _mode(present)
                levels[c] = Counter(present)  # the missing ones become the mode
                levels[c][fill[c]] += counts[None]
    parts = [part["sums"] for part in counted]
    if any(part is None for part in parts):
        parts = run("sums", [fill.get(c) for c in info.feature_columns])
    stats = normalization.finish(sum(parts[1:], parts[0]), config.normalize.method)
    ordered = {
        c: sorted(counts, key=lambda v: (v is not None, v or "")) for c, counts in levels.items()
    }
    return stats, {"fill": fill, "levels": ordered}


def _mode(values: Any) -> Any:
    """The most frequent value (ties: the smallest), of an array or of {value: count}."""
    import numpy as np

    if isinstance(values, dict):
        return min(values, key=lambda v: (-values[v], v))
    unique, counts = np.unique(values, return_counts=True)
    return float(unique[np.argmax(counts)])  # argmax takes the first: the smallest value


def _write_shard(
    spec: dict, info: Any, stats: dict, augment: Any, fill: dict, here: tuple, *chunks: Any
) -> dict:
    """Builds one shard; returns its split, path, rows and the values it imputed per column
    (originals only). On the stage's node (``here``: its node id, None for a Ray client's
    process, and out_dir) the task writes the shard itself and adds its ``bytes`` and
    ``sha256``; elsewhere it adds the encoded shard (``data``) for the stage to write (only
    the stage's node has out_dir)."""
    import numpy as np
    import pyarrow as pa
    import ray

    from components.data import normalization, shards
    from components.data.augment import augment_images, jitter_features
    from components.data.table import numeric_inputs

    chunk_ids = np.unique(spec["chunk"])
    where = np.searchsorted(chunk_ids, spec["chunk"])
    aug = spec["copy"] > 0
    imputed: dict[str, int] = {}
    if info.kind == "image":
        c, h, w = info.shape
        x = np.empty((len(where), c, h, w), dtype=np.float32)
        for i, data in enumerate(chunks):
            mine = where == i
            x[mine] = data[spec["local"][mine]]
        x /= np.float32(info.pixel_scale)
        if aug.any():
            x[aug] = augment_images(x[aug], spec["row_id"][aug], spec["copy"][aug], augment)
        x = normalization.apply(x, stats)
        table = shards.image_table(x, spec["label"], spec["row_id"], spec["copy"])
    else:
        parts = [data.take(spec["local"][where == i]) for i, data in enumerate(chunks)]
        # rows come from several chunks: put them back in the shard's order
        order = np.concatenate([np.flatnonzero(where == i) for i in range(len(chunks))])
        table = pa.concat_tables(parts).take(np.argsort(order, kind="stable"))
        feats = (
            np.stack(
                [table.column(col).to_numpy().astype(np.float64) for col in info.feature_columns],
                axis=1,
            )
            if info.feature_columns
            else np.zeros((table.num_rows, 0))
        )
        original = spec["copy"] == 0
        for j, col in enumerate(info.feature_columns):
            if col in fill:
                imputed[col] = int(np.isnan(feats[original, j]).sum())
        # the same function a loaded model applies to raw rows: fill, then normalize
        feats = numeric_inputs(feats, [fill.get(c) for c in info.feature_columns], stats)
        if aug.any() and info.feature_columns:
            feats[aug] = jitter_features(
                feats[aug], spec["row_id"][aug], spec["copy"][aug], augment
            )
        columns = {
            col: pa.array(feats[:, j], pa.float32()) for j, col in enumerate(info.feature_columns)
        }
        for col in info.categorical_columns:
            values = table.column(col)
            if col in fill:
                imputed[col] = int(np.asarray(values.is_null())[original].sum())
                values = values.fill_null(fill[col])
            columns[col] = values
        if info.task == "regression":
            columns["target"] = pa.array(spec["label"], pa.float64())
        else:
            columns["label"] = pa.array(spec["label"], pa.int64())
        columns["row_id"] = pa.array(spec["row_id"], pa.int64())
        columns["copy"] = pa.array(spec["copy"], pa.int32())
        table = pa.table(columns)
    shard = {"path": spec["path"], "split": spec["split"], "rows": table.num_rows}
    node_id, out_dir = here
    data = shards.encode_table(table)
    # (A task still running after its stage failed and dropped out_dir must not make it again.)
    here_now = node_id is not None and ray.get_runtime_context().get_node_id() == node_id
    if here_now and Path(out_dir).is_dir():
        written = shards.write_file(data, Path(out_dir) / spec["path"])
        return {**shard, **written, "imputed": imputed}
    return {**shard, "data": data, "imputed": imputed}


# -- driver helpers ----------------------------------------------------------------------------


def _run_tasks(
    submit: Callable[[Any], Any],
    items: list[Any],
    limit: int,
    on_done: Callable[[Any], Any] | None = None,
    first_only: bool = False,
) -> list[Any]:
    """Runs ``submit(item)`` for every item, at most ``limit`` tasks at once; returns the
    results in item order (tasks finish in any order: no core waits on a slow neighbour).

    ``on_done(result)`` runs on each result as it arrives; what it returns, when not None, is
    kept in place of the result (the write phase keeps a shard's metadata, not its bytes). If a
    task or ``on_done`` fails, the tasks still running are waited for before the error is raised.

    With ``first_only`` a submission returns several refs: only the first is fetched and the
    result is ``(value, other refs...)``, so that bulk data stays in the object store.
    """
    import ray

    from components.data.shards import ShardWriteError
    from components.data.sources import SourceError

    results: list[Any] = [None] * len(items)
    running: dict[Any, tuple[int, Any]] = {}
    queue = iter(enumerate(items))

    def top_up() -> None:
        while len(running) < limit and (nxt := next(queue, None)) is not None:
            refs = submit(nxt[1])
            running[refs[0] if first_only else refs] = (nxt[0], refs)

    while True:
        top_up()
        if not running:
            return results
        [done], _ = ray.wait(list(running), num_returns=1)
        index, refs = running.pop(done)
        top_up()  # the next task starts before this result is handled: no core waits on it
        try:
            value = ray.get(done)
            if on_done is not None:
                kept = on_done(value)
                value = value if kept is None else kept
        except ray.exceptions.RayTaskError as e:
            _wait_out(list(running))
            # a source or shard error names the file: raise it as itself, not wrapped in Ray's
            cause = getattr(e, "cause", None)
            if isinstance(cause, SourceError | ShardWriteError):
                raise cause from None
            raise
        except BaseException:
            _wait_out(list(running))
            raise
        results[index] = (value, *refs[1:]) if first_only else value


def _wait_out(refs: list[Any], timeout: float = 60.0) -> None:
    """Waits for the tasks still running after one failed to end, so a failed stage leaves no
    work of its own behind (nor a task writing into the output it is about to remove).

    They are not cancelled: in Ray 2.60 a task cancelled as it completes can crash its owner,
    here the driver ("Check failed: ... Tried to complete task that was not pending"). At most
    ``limit`` tasks run, so this waits for one task's time at most (``timeout`` bounds a hung
    one).
    """
    import ray

    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout)


def _kept_rows(metas: list) -> dict[str, Any]:
    """Concatenates the kept rows of every chunk into arrays in global source order."""
    import numpy as np

    offsets = np.cumsum([0] + [m.rows_in for m in metas])
    return {
        "row_id": np.concatenate(
            [o + m.pos for o, m in zip(offsets, metas, strict=False)] or [[]]
        ).astype(np.int64),
        "label": np.concatenate([m.labels for m in metas]),
        "hash": np.concatenate([m.hashes for m in metas]),
        "chunk": np.concatenate(
            [np.full(len(m.pos), c, dtype=np.int32) for c, m in enumerate(metas)]
        ),
        "local": np.concatenate([np.arange(len(m.pos), dtype=np.int32) for m in metas]),
    }


def _location(metas: list, rows: dict, i: int) -> tuple[str, int]:
    m = metas[rows["chunk"][i]]
    j = rows["local"][i]
    return m.sources[m.loc_file[j]], int(m.loc_index[j])


def _first_occurrence(hashes: Any) -> tuple[Any, Any]:
    """Returns (first index of each distinct hash, group of each row)."""
    import numpy as np

    if len(hashes) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    return first, inverse.ravel()


def _check_rejected(
    rows_in: int, rejects: list, by_reason: dict[str, int], n_dups: int, config: PrepareConfig
) -> None:
    if not rejects or len(rejects) <= config.clean.max_rejected_fraction * rows_in:
        return
    counts = ", ".join(f"{k}={v}" for k, v in by_reason.items())
    examples = "; ".join(f"{r.source}:{r.index} {r.reason} ({r.detail})" for r in rejects[:5])
    raise RejectedRowsError(
        f"data.prepare: {len(rejects)} of {rows_in} input rows ({len(rejects) / rows_in:.1%}) "
        f"were quarantined, more than clean.max_rejected_fraction="
        f"{config.clean.max_rejected_fraction}. By reason: {counts} (and {n_dups} duplicates). "
        f"First rows: {examples}"
    )


def _split(strata: Any, first: Any, inverse: Any, config: PrepareConfig) -> Any:
    """Assigns 0 (train), 1 (val) or 2 (test) to every row, stratified by ``strata`` (the
    class labels; all zeros for a regression).

    The draw is over distinct contents (``first``: a representative row of each group), and
    every row follows its group, so identical rows never land in two splits. The loop runs
    over the strata the rows hold, never over a count read from the input.
    """
    import numpy as np

    group_split = np.zeros(len(first), dtype=np.int8)
    group_stratum = strata[first]
    for stratum in np.unique(group_stratum).tolist():
        members = np.flatnonzero(group_stratum == stratum)
        rng = np.random.default_rng([config.split.seed, stratum])
        members = members[rng.permutation(len(members))]
        n_test = int(round(config.split.test * len(members)))
        n_val = int(round(config.split.val * len(members)))
        group_split[members[:n_test]] = 2
        group_split[members[n_test : n_test + n_val]] = 1
    return group_split[inverse]


def _write_quarantine(out_dir: Path, rejects: list, rows_per_shard: int) -> list[dict]:
    import pyarrow as pa

    from components.data import shards

    listed = []
    for j, lo in enumerate(range(0, len(rejects), rows_per_shard)):
        part = rejects[lo : lo + rows_per_shard]
        table = pa.table(
            {name: [getattr(r, name) for r in part] for name in shards.QUARANTINE_SCHEMA.names},
            schema=shards.QUARANTINE_SCHEMA,
        )
        name = shards.shard_name("quarantine", j)
        listed.append(
            {"path": name, "split": "quarantine", **shards.write_table(table, out_dir / name)}
        )
    return listed


def _describe(
    config: PrepareConfig,
    info: Any,
    num_classes: int | None,
    stats: dict,
    accounting: dict,
    shards: list[dict],
    quarantine: list[dict],
    table: dict[str, Any],
) -> dict[str, Any]:
    """The contents of ``dataset.json``: everything a trainer or an inference service needs
    (for a table also: the task, the target, what fills a missing value, every categorical
    column's train levels, a regression target's mean and scale)."""
    label_column = "target" if info.task == "regression" else "label"
    if info.kind == "image":
        columns = {
            "image": {"dtype": "float32", "shape": list(info.shape)},
            "label": {"dtype": "int64"},
        }
    else:
        columns = {c: {"dtype": "float32"} for c in info.feature_columns}
        columns.update({c: {"dtype": "string"} for c in info.categorical_columns})
        columns[label_column] = {"dtype": "float64" if info.task == "regression" else "int64"}
    columns["row_id"] = {"dtype": "int64"}
    columns["copy"] = {"dtype": "int32"}
    names = info.class_names or [str(i) for i in range(num_classes or 0)]
    facts = {}
    if info.kind == "tabular":
        facts = {
            "task": info.task,
            "target": info.target,
            "impute": info.impute,
            "fill": table.get("fill", {}),
            "levels": table.get("levels", {}),
            "target_normalization": table.get("target_normalization"),
        }
    return {
        "format": FORMAT,
        "kind": info.kind,
        "source": config.source.kind,
        "image_shape": list(info.shape) if info.shape else None,
        "feature_columns": info.feature_columns,
        "categorical_columns": info.categorical_columns,
        "label_column": label_column,
        "num_classes": num_classes,
        "class_names": names if num_classes is not None else None,
        "columns": columns,
        "normalization": stats,
        "accounting": accounting,
        "splits": {
            split: {
                "rows": accounting["rows_out_by_split"][split],
                "originals": accounting["originals_by_split"][split],
                "shards": [s["path"] for s in shards if s["split"] == split],
            }
            for split in SPLITS
        },
        "shards": shards,
        "quarantine": {
            "rows": accounting["quarantined"] + accounting["duplicates_removed"],
            "columns": ["source", "index", "reason", "detail", "label"],
            "shards": quarantine,
        },
        "config": config.model_dump(mode="json"),
        **facts,
    }
