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

    version = "1"
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
    """The files and folders a source reads (none for the bundled digits)."""
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

    # 1. read -----------------------------------------------------------------------------------
    read_task = ray.remote(num_returns=2, num_cpus=1)(_read_unit)
    source_ref = ray.put(config.source)
    done = Counter()

    def count(key: str, rows: int) -> None:
        done[key] += rows
        report(rows_done=done[key], phase=key)

    read = _run_tasks(
        lambda u: read_task.remote(source_ref, info, u),
        units,
        limit,
        on_done=lambda meta: count("read", meta.rows_in),
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
        where = ", ".join(source_paths(config.source)) or config.source.kind
        raise sources.SourceError(f"{where}: no rows to read (the source is empty)")
    by_reason = dict(sorted(Counter(r.reason for r in rejects).items()))
    _check_rejected(rows_in, rejects, by_reason, len(duplicates), config)
    if len(rows["label"]) == 0:
        raise RejectedRowsError(f"data.prepare: no rows left of {rows_in} input rows")
    num_classes = info.num_classes or int(rows["label"].max()) + 1
    split_of = _split(rows["label"], first, inverse, config)

    phases["dedup_split"] = time.time() - started - sum(phases.values())
    # 3. statistics over the train originals ----------------------------------------------------
    partial_task = ray.remote(num_cpus=1)(_partial_unit)
    train = split_of == 0
    jobs = [(c, rows["local"][train & (rows["chunk"] == c)]) for c in range(len(data_refs))]
    jobs = [(c, local) for c, local in jobs if len(local)]
    parts = _run_tasks(
        lambda job: partial_task.remote(info, job[1], data_refs[job[0]]), jobs, limit
    )
    total = sum(parts[1:], parts[0]) if parts else None
    if total is None:
        raise RejectedRowsError("data.prepare: the train split is empty; lower split.val/test")
    scale = info.pixel_scale if info.kind == "image" else 1.0
    stats = normalization.finish(total, config.normalize.method, scale)
    stats["pixel_scale"] = scale if info.kind == "image" else None

    phases["statistics"] = time.time() - started - sum(phases.values())
    # 4. write shards ---------------------------------------------------------------------------
    copies = config.augment.copies
    if info.kind == "tabular" and config.augment.jitter == 0:
        copies = 0
    # The write tasks run wherever Ray finds a CPU and send the encoded shard back: only this
    # stage's process writes into out_dir. out_dir is local to the stage's node (for an s3://
    # or file:// store it is the node's download cache, published by upload afterwards), so a
    # task on another node could not write into it; pinning the tasks to this node instead
    # hangs for ever when the node has no free CPU (a 0-CPU stage task on a num-cpus=0 head,
    # or a 1-CPU head already holding a job driver). A shard's bytes cross the object store
    # once, like the rows that went into it.
    write_task = ray.remote(num_cpus=1)(_write_shard)

    def write(value: dict) -> dict:
        meta = write_file(value.pop("data"), out_dir / value["path"])
        count("write", value["rows"])
        return {**value, **meta}

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
    job_args = (info, stats, config.augment)
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
    assert accounting["balanced"], accounting  # the reads above count every row exactly once
    dataset = _describe(config, info, num_classes, stats, accounting, shards, quarantine)
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
    from components.data import sources

    chunk = sources.read(source, info, unit)
    return chunk.meta(), chunk.data


def _partial_unit(info: Any, local: Any, data: Any) -> Any:
    import numpy as np

    from components.data import normalization

    if info.kind == "image":
        return normalization.image_partial(data[local])
    table = data.take(local)
    cols = [table.column(c).to_numpy().astype(np.float64) for c in info.feature_columns]
    return normalization.table_partial(cols)


def _write_shard(spec: dict, info: Any, stats: dict, augment: Any, *chunks: Any) -> dict:
    """Builds one shard and returns it encoded (``data``) with its split, path and rows; the
    stage writes it (a task may run on any node, and only the stage's node has out_dir)."""
    import numpy as np
    import pyarrow as pa

    from components.data import normalization, shards
    from components.data.augment import augment_images, jitter_features

    chunk_ids = np.unique(spec["chunk"])
    where = np.searchsorted(chunk_ids, spec["chunk"])
    aug = spec["copy"] > 0
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
        feats = normalization.apply(feats, stats) if info.feature_columns else feats
        if aug.any() and info.feature_columns:
            feats[aug] = jitter_features(
                feats[aug], spec["row_id"][aug], spec["copy"][aug], augment
            )
        columns = {
            col: pa.array(feats[:, j], pa.float32()) for j, col in enumerate(info.feature_columns)
        }
        for col in info.categorical_columns:
            columns[col] = table.column(col)
        columns["label"] = pa.array(spec["label"], pa.int64())
        columns["row_id"] = pa.array(spec["row_id"], pa.int64())
        columns["copy"] = pa.array(spec["copy"], pa.int32())
        table = pa.table(columns)
    data = shards.encode_table(table)
    return {"path": spec["path"], "split": spec["split"], "rows": table.num_rows, "data": data}


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
    task or ``on_done`` fails, the tasks still running are stopped before the error is raised.

    With ``first_only`` a submission returns several refs: only the first is fetched and the
    result is ``(value, other refs...)``, so that bulk data stays in the object store.
    """
    import ray

    from components.data.sources import SourceError

    results: list[Any] = [None] * len(items)
    running: dict[Any, tuple[int, Any]] = {}
    queue = iter(enumerate(items))
    while True:
        while len(running) < limit and (nxt := next(queue, None)) is not None:
            refs = submit(nxt[1])
            running[refs[0] if first_only else refs] = (nxt[0], refs)
        if not running:
            return results
        [done], _ = ray.wait(list(running), num_returns=1)
        index, refs = running.pop(done)
        try:
            value = ray.get(done)
            if on_done is not None:
                kept = on_done(value)
                value = value if kept is None else kept
        except ray.exceptions.RayTaskError as e:
            _stop(list(running))
            # a source error names the bad file: raise it as itself, not wrapped in Ray's error
            cause = getattr(e, "cause", None)
            if isinstance(cause, SourceError):
                raise cause from None
            raise
        except BaseException:
            _stop(list(running))
            raise
        results[index] = (value, *refs[1:]) if first_only else value


def _stop(refs: list[Any], timeout: float = 60.0) -> None:
    """Cancels the tasks still running after one failed, and waits until they have ended, so
    a failed stage leaves no work of its own behind on the cluster."""
    import ray

    for ref in refs:
        ray.cancel(ref)
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
        "label": np.concatenate([m.labels for m in metas]).astype(np.int64),
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


def _split(labels: Any, first: Any, inverse: Any, config: PrepareConfig) -> Any:
    """Assigns 0 (train), 1 (val) or 2 (test) to every row, stratified by label.

    The draw is over distinct contents (``first``: a representative row of each group), and
    every row follows its group, so identical rows never land in two splits.
    """
    import numpy as np

    group_split = np.zeros(len(first), dtype=np.int8)
    group_label = labels[first]
    # The labels present, not range(num_classes): work follows the rows, never a number.
    for label in np.unique(group_label).tolist():
        members = np.flatnonzero(group_label == label)
        rng = np.random.default_rng([config.split.seed, label])
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
    num_classes: int,
    stats: dict,
    accounting: dict,
    shards: list[dict],
    quarantine: list[dict],
) -> dict[str, Any]:
    """The contents of ``dataset.json``: everything a trainer or an inference service needs."""
    if info.kind == "image":
        columns = {
            "image": {"dtype": "float32", "shape": list(info.shape)},
            "label": {"dtype": "int64"},
        }
    else:
        columns = {c: {"dtype": "float32"} for c in info.feature_columns}
        columns.update({c: {"dtype": "string"} for c in info.categorical_columns})
        columns["label"] = {"dtype": "int64"}
    columns["row_id"] = {"dtype": "int64"}
    columns["copy"] = {"dtype": "int32"}
    names = info.class_names or [str(i) for i in range(num_classes)]
    return {
        "format": FORMAT,
        "kind": info.kind,
        "source": config.source.kind,
        "image_shape": list(info.shape) if info.shape else None,
        "feature_columns": info.feature_columns,
        "categorical_columns": info.categorical_columns,
        "label_column": "label",
        "num_classes": num_classes,
        "class_names": names,
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
    }
