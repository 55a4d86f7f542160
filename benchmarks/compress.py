"""model.compress figures, as JSON (one run).

    .venv/bin/python benchmarks/compress.py                # pipelines/compress.yaml as shipped
    .venv/bin/python benchmarks/compress.py --epochs 5     # a shorter classifier training

1. The digits CNN: ``pipelines/compress.yaml`` (its ``classifier`` trained, then its ``pruned``
   stage, which times the original and its compressed copy in the same process, interleaved in
   rounds, median after warm-up, at one thread). Goals: 50% global pruning plus one fine-tuning
   epoch losing at most 0.5 points; its ``int8`` stage (static int8) at least 2x faster than
   fp32 at batch 64, losing at most 0.5 points.
2. Dynamic int8 size of the text LSTM language model and the tabular MLP at the shapes
   ``pipelines/text.yaml`` and ``pipelines/tabular.yaml`` train (the ratio depends on the
   shapes only: int8 weights plus a scale per tensor). Goal: at most 0.3x.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def digits(epochs: int | None, rounds: int) -> dict:
    from pipelines import engine, spec

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"storage={tmp}/store", f"pruned.rounds={rounds}", f"int8.rounds={rounds}"]
        if epochs is not None:
            overrides.append(f"classifier.epochs={epochs}")
        pipeline = spec.load(ROOT / "pipelines" / "compress.yaml", overrides)
        record = engine.run_pipeline(pipeline, printer=lambda _line: None)
        if not record.ok:
            raise SystemExit(f"the pipeline failed: {record.error}")
        pruned = record.stages["pruned"].metrics
        int8 = record.stages["int8"].metrics
    return {
        "static_int8": {
            "fp32_latency_ms_b64": int8["original/latency_ms_b64"],
            "int8_latency_ms_b64": int8["compress/latency_ms_b64"],
            "speedup_b64": int8["compress/speedup_b64"],
            "speedup_b1": int8["compress/speedup_b1"],
            "fp32_test_accuracy": int8["original/test/accuracy"],
            "test_accuracy": int8["test/accuracy"],
            "accuracy_points_lost": -100 * int8["compress/metric_delta"],
        },
        "prune_50_global_finetune_1": {
            "sparsity": pruned["compress/sparsity"],
            "gzip_ratio": pruned["compress/gzip_ratio"],
            "fp32_test_accuracy": pruned["original/test/accuracy"],
            "test_accuracy": pruned["test/accuracy"],
            "accuracy_points_lost": -100 * pruned["compress/metric_delta"],
        },
    }


def dynamic_size_ratio(module) -> dict:
    import torch

    from components.compression import pack_dynamic, quantize_dynamic

    def size(state) -> int:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return len(buffer.getvalue())

    fp32 = size(module.state_dict())
    int8 = size(pack_dynamic(quantize_dynamic(module.eval())))
    return {"fp32_bytes": fp32, "int8_bytes": int8, "size_ratio": int8 / fp32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="classifier epochs")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per model")
    args = parser.parse_args()
    from components.tabular.model import MLP
    from components.text.models import LSTMLanguageModel

    result = {
        "digits_cnn": digits(args.epochs, args.rounds),
        # pipelines/text.yaml's lstm: 2 x 256 over the plays' 77 characters, embedding 128.
        "text_lstm_dynamic_int8": dynamic_size_ratio(LSTMLanguageModel(77, 128, 256, 2)),
        # pipelines/tabular.yaml's mlp: 25 numeric columns, plan and site embedded, [128, 64].
        "tabular_mlp_dynamic_int8": dynamic_size_ratio(MLP(25, [7, 7], [5, 5], [128, 64], 1)),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
