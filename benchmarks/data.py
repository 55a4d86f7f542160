"""Throughput and peak memory of ``data.prepare`` against a single-process numpy/pandas baseline.

    .venv/bin/python benchmarks/data.py                      # 200,000 28x28 images, both runs
    .venv/bin/python benchmarks/data.py --large-rows 2000000  # plus 2M rows, 1 GiB object store
    .venv/bin/python benchmarks/data.py --rows 0 --large-rows 2000000  # the 2M run alone

The input is MNIST-style IDX files generated from scikit-learn's digits (upscaled to 28x28,
randomly shifted, with sparse pixel noise so rows are distinct). Both implementations do the
same work: read + check + hash every row, drop duplicates, a stratified split, normalization
statistics over train, 2 augmented copies of each train row (the same augmentation kernel),
normalization, and zstd Parquet shards of ``rows_per_shard`` rows. Each runs in its own
process; peak memory is the largest sum of PSS (proportional set size: shared object-store
pages counted once) over the process and all its descendants, sampled every 0.2 s, and CPU
seconds are summed over the same processes (Ray's raylet and GCS included). ``speedup`` is
best-of-runs wall time, ``speedup_median`` the median, ``cpu_bound_speedup`` the baseline's
CPU seconds over raypipe's per core: what idle cores would give on a busy shared machine.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

AUGMENT = {"copies": 2, "rotate": 10, "shift": 0.1, "zoom": 0.1, "seed": 0}
SPLIT = {"val": 0.1, "test": 0.2, "seed": 0}


def generate(workdir: Path, rows: int, files: int = 4, seed: int = 0) -> tuple[list, list]:
    """Writes ``files`` pairs of IDX files holding ``rows`` 28x28 images in all."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    big = np.kron(digits.images / 16.0, np.ones((3, 3)))  # 24x24
    templates = np.zeros((len(big), 28, 28), np.float32)
    templates[:, 2:26, 2:26] = big
    rng = np.random.default_rng(seed)
    images, labels = [], []
    per_file = -(-rows // files)
    for f in range(files):
        n = min(per_file, rows - f * per_file)
        img_path = workdir / f"part{f}-images-idx3-ubyte"
        lbl_path = workdir / f"part{f}-labels-idx1-ubyte"
        with open(img_path, "wb") as fi, open(lbl_path, "wb") as fl:
            fi.write(bytes([0, 0, 8, 3]) + np.array([n, 28, 28], ">u4").tobytes())
            fl.write(bytes([0, 0, 8, 1]) + np.array([n], ">u4").tobytes())
            for start in range(0, n, 50_000):
                m = min(50_000, n - start)
                pick = rng.integers(0, len(templates), m)
                shift = rng.integers(-2, 3, size=(m, 2))
                x = templates[pick]
                for dy in range(-2, 3):
                    for dx in range(-2, 3):
                        sel = (shift[:, 0] == dy) & (shift[:, 1] == dx)
                        x[sel] = np.roll(x[sel], (dy, dx), axis=(1, 2))
                noise = rng.random((m, 28, 28)) < 0.03
                x = np.where(noise, rng.random((m, 28, 28)), x)
                fi.write((x * 255).astype(np.uint8).tobytes())
                fl.write(digits.target[pick].astype(np.uint8).tobytes())
        images.append(str(img_path))
        labels.append(str(lbl_path))
    return images, labels


# -- the two implementations (each runs in a child process) -----------------------------------


def run_raypipe(args: argparse.Namespace) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    from components.data.config import PrepareConfig
    from components.data.prepare import prepare

    init = {"num_cpus": args.cpus, "include_dashboard": False, "logging_level": "WARNING"}
    if args.object_store_bytes:
        init["object_store_memory"] = args.object_store_bytes
    ray.init(address="local", **init)
    config = PrepareConfig.model_validate(
        {
            "source": {"kind": "mnist_idx", "images": args.images, "labels": args.labels},
            "augment": AUGMENT,
            "split": SPLIT,
            "rows_per_shard": args.rows_per_shard,
            "chunk_rows": args.chunk_rows,
        }
    )
    start = time.perf_counter()
    metrics = prepare(config, Path(args.out))
    seconds = time.perf_counter() - start
    ray.shutdown()
    return {"seconds": seconds, "metrics": metrics}


def run_baseline(args: argparse.Namespace) -> dict:
    """The same work in one process with numpy and pyarrow, whole arrays in memory."""
    import hashlib

    import pyarrow.parquet as pq

    from components.data.augment import augment_images
    from components.data.config import AugmentConfig
    from components.data.shards import WRITE_OPTIONS, image_table

    start = time.perf_counter()
    images, labels, row_ids, offset = [], [], [], 0
    for img_path, lbl_path in zip(args.images, args.labels, strict=True):
        raw = np.fromfile(img_path, dtype=np.uint8)
        n, h, w = np.frombuffer(raw[4:16].tobytes(), ">u4")
        x = raw[16 : 16 + n * h * w].reshape(-1, 1, h, w)
        y = np.fromfile(lbl_path, dtype=np.uint8)[8:].astype(np.int64)
        ok = y < 10
        images.append(x[ok])
        labels.append(y[ok])
        row_ids.append(offset + np.flatnonzero(ok))
        offset += n
    x, y, row_id = np.concatenate(images), np.concatenate(labels), np.concatenate(row_ids)
    flat = x.reshape(len(x), -1)
    hashes = np.array(
        [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in flat], dtype="S16"
    )
    _, first = np.unique(hashes, return_index=True)
    keep = np.sort(first)
    x, y, row_id = x[keep], y[keep], row_id[keep]
    split = np.zeros(len(y), np.int8)
    for label in range(10):
        members = np.flatnonzero(y == label)
        members = members[np.random.default_rng([SPLIT["seed"], label]).permutation(len(members))]
        n_test, n_val = round(SPLIT["test"] * len(members)), round(SPLIT["val"] * len(members))
        split[members[:n_test]] = 2
        split[members[n_test : n_test + n_val]] = 1
    # exact statistics from a histogram of the uint8 train pixels (no float64 copy)
    hist = np.bincount(x[split == 0].ravel(), minlength=256).astype(np.float64)
    values = np.arange(256) / 255.0
    mean = (hist * values).sum() / hist.sum()
    std = np.sqrt((hist * (values - mean) ** 2).sum() / hist.sum())
    cfg = AugmentConfig(**AUGMENT)
    out = Path(args.out)
    rows_out = 0
    for s, name in enumerate(("train", "val", "test")):
        pick = np.flatnonzero(split == s)
        k = cfg.copies + 1 if name == "train" else 1
        order, copy = np.repeat(pick, k), np.tile(np.arange(k, dtype=np.int32), len(pick))
        (out / name).mkdir(parents=True, exist_ok=True)
        for j, lo in enumerate(range(0, len(order), args.rows_per_shard)):
            sel, cp = order[lo : lo + args.rows_per_shard], copy[lo : lo + args.rows_per_shard]
            batch = x[sel].astype(np.float32) / np.float32(255.0)
            aug = cp > 0
            batch[aug] = augment_images(batch[aug], row_id[sel][aug], cp[aug], cfg)
            batch = (batch - np.float32(mean)) / np.float32(std)
            table = image_table(batch, y[sel], row_id[sel], cp)
            pq.write_table(
                table,
                out / name / f"part-{j:05d}.parquet",
                row_group_size=table.num_rows,
                **WRITE_OPTIONS,
            )
            rows_out += len(sel)
    return {"seconds": time.perf_counter() - start, "rows_in": int(offset), "rows_out": rows_out}


# -- measurement -------------------------------------------------------------------------------


def _tree_sample(pid: int, cpu: dict[int, float]) -> tuple[int, int]:
    """Returns (sum of PSS, sum of RSS) in bytes over a process and its descendants, and
    records each one's CPU seconds (user + system) so far in ``cpu``."""
    import psutil

    pss = rss = 0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for p in procs:
        try:
            info = p.memory_full_info()
            times = p.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pss += getattr(info, "pss", info.rss)
        rss += info.rss
        cpu[p.pid] = times.user + times.system
    return pss, rss


def measure(which: str, args: argparse.Namespace, extra: list[str]) -> dict:
    """Runs one implementation in a child process, sampling its memory; returns its figures."""
    result_file = Path(args.workdir) / f"{which}.json"
    cmd = [sys.executable, __file__, "--child", which, "--result", str(result_file), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    peak_pss = peak_rss = 0
    cpu: dict[int, float] = {}
    while proc.poll() is None:
        pss, rss = _tree_sample(proc.pid, cpu)
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(0.2)
    if proc.returncode != 0:
        raise RuntimeError(f"{which} run failed with exit code {proc.returncode}")
    result = json.loads(result_file.read_text())
    result["peak_pss_mib"] = round(peak_pss / 2**20, 1)
    result["peak_rss_sum_mib"] = round(peak_rss / 2**20, 1)
    result["cpu_seconds"] = round(sum(cpu.values()), 1)  # last samples: may miss < 0.2 s each
    return result


def compare(workdir: Path, rows: int, args: argparse.Namespace, baseline: bool, store: int) -> dict:
    data = workdir / f"input-{rows}"
    data.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    images, labels = generate(data, rows)
    common = [
        "--images",
        *images,
        "--labels",
        *labels,
        "--rows-per-shard",
        str(args.rows_per_shard),
    ]
    common += ["--workdir", str(workdir), "--cpus", str(args.cpus)]
    figures: dict = {"rows": rows, "generate_seconds": round(time.perf_counter() - t, 1)}
    # other work on a shared machine skews both runs: say how busy it was
    figures["load_average_before"] = [round(v, 2) for v in os.getloadavg()]
    ray_out = workdir / f"raypipe-{rows}"
    extra = ["--out", str(ray_out), "--chunk-rows", str(args.chunk_rows)]
    if store:
        extra += ["--object-store-bytes", str(store)]
    base_out = workdir / f"baseline-{rows}"
    runs: dict[str, list] = {"raypipe": [], "baseline": []}
    # alternate the two, so that load from other work on the machine hits both alike
    for _ in range(args.repeats if baseline else 1):
        runs["raypipe"].append(measure("raypipe", args, common + extra))
        output_bytes = sum(f.stat().st_size for f in ray_out.rglob("*.parquet"))
        shutil.rmtree(ray_out, ignore_errors=True)
        if baseline:
            runs["baseline"].append(measure("baseline", args, common + ["--out", str(base_out)]))
            shutil.rmtree(base_out, ignore_errors=True)
    ray = min(runs["raypipe"], key=lambda r: r["seconds"])
    figures["raypipe"] = {
        "seconds": round(ray["seconds"], 2),
        "seconds_all_runs": [round(r["seconds"], 2) for r in runs["raypipe"]],
        "rows_per_s": round(rows / ray["seconds"], 1),
        "rows_written": ray["metrics"]["train/rows"]
        + ray["metrics"]["val/rows"]
        + ray["metrics"]["test/rows"],
        "cpu_seconds": ray["cpu_seconds"],
        "peak_pss_mib": max(r["peak_pss_mib"] for r in runs["raypipe"]),
        "peak_rss_sum_mib": max(r["peak_rss_sum_mib"] for r in runs["raypipe"]),
        "phase_seconds": {
            k.removeprefix("data/").removesuffix("_seconds"): v
            for k, v in ray["metrics"].items()
            if k.endswith("_seconds") and k != "data/seconds"
        },
        "object_store_bytes": store or "ray default",
        "output_bytes": output_bytes,
    }
    if baseline:
        base = min(runs["baseline"], key=lambda r: r["seconds"])
        figures["baseline"] = {
            "seconds": round(base["seconds"], 2),
            "seconds_all_runs": [round(r["seconds"], 2) for r in runs["baseline"]],
            "rows_per_s": round(rows / base["seconds"], 1),
            "rows_written": base["rows_out"],
            "cpu_seconds": base["cpu_seconds"],
            "peak_pss_mib": max(r["peak_pss_mib"] for r in runs["baseline"]),
            "peak_rss_sum_mib": max(r["peak_rss_sum_mib"] for r in runs["baseline"]),
        }
        figures["speedup"] = round(base["seconds"] / ray["seconds"], 2)
        figures["speedup_median"] = round(
            float(np.median(figures["baseline"]["seconds_all_runs"]))
            / float(np.median(figures["raypipe"]["seconds_all_runs"])),
            2,
        )
        # what 2 idle cores would give: the baseline's CPU time over raypipe's, per core
        figures["cpu_bound_speedup"] = round(
            base["cpu_seconds"] / (ray["cpu_seconds"] / args.cpus), 2
        )
    figures["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    shutil.rmtree(data, ignore_errors=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="0 skips the comparison")
    parser.add_argument("--large-rows", type=int, default=0, help="0 skips the large run")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each")
    parser.add_argument("--rows-per-shard", type=int, default=8192)
    parser.add_argument("--chunk-rows", type=int, default=8192)
    parser.add_argument("--object-store-bytes", type=int, default=0)
    parser.add_argument("--large-object-store-bytes", type=int, default=2**30)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child", choices=["raypipe", "baseline"])
    parser.add_argument("--result")
    parser.add_argument("--images", nargs="*")
    parser.add_argument("--labels", nargs="*")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        runner = run_raypipe if args.child == "raypipe" else run_baseline
        Path(args.result).write_text(json.dumps(runner(args)))
        return
    keep_workdir = args.workdir is not None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="raypipe-bench-"))
    args.workdir = str(workdir)
    report = {
        "benchmark": "data.prepare",
        "cpus": args.cpus,
        "machine_cpus": os.cpu_count(),
        "work": "check + hash + dedup + stratified split + standard normalize + "
        f"{AUGMENT['copies']} augmented copies of train + zstd Parquet shards",
    }
    if args.rows:
        report["main"] = compare(
            workdir, args.rows, args, baseline=True, store=args.object_store_bytes
        )
    if args.large_rows:
        report["large"] = compare(
            workdir, args.large_rows, args, baseline=False, store=args.large_object_store_bytes
        )
    if not keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
