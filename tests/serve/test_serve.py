"""Serving for real, on one Ray Serve instance for the whole module: a pipeline trains tiny
models on a local two-node cluster, its gate registers the champion as an MLflow model, and
its ``serve.deploy`` stage puts ``models:/digits@champion`` behind Serve's HTTP proxy on
127.0.0.1 (a non-default port). The tests then ask it over HTTP: predictions equal the offline
model's, MLflow's own loader gives the same, every kind of bad request gets a 4xx, the CLI
serves a run's stage beside it, and a gate that moves the alias under load swaps the version
with no failed request.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from cli_helpers import cli, cli_env, wait_for
from pipeline_helpers import run_ok

from pipelines import spec

#: Serve's proxy must pass its ready check on a loaded machine (its controller reads this when
#: it starts, so it is set before the cluster starts).
os.environ["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] = "60"

PIPELINE = """\
name: serve-test
storage: {storage}
stages:
  prepare:
    uses: data.prepare
    with: {{split: {{val: 0.1, test: 0.2, seed: 0}}}}
  weak:
    uses: vision.train
    needs: [prepare]
    resources: {{workers: 1, cpus_per_worker: 1}}
    with: {{epochs: 1, width: 4, lr: 1.0e-4, batch_size: 64}}
  strong:
    uses: vision.train
    needs: [prepare]
    resources: {{workers: 1, cpus_per_worker: 1}}
    with: {{epochs: 2, width: 8, lr: 3.0e-3, batch_size: 64}}
  vae:
    uses: generative.vae
    needs: [prepare, weak]          # scored in the classifier's features
    resources: {{workers: 1, cpus_per_worker: 1}}
    with: {{epochs: 1, width: 4, latent_dim: 4, conditional: true}}
  gate:
    uses: tune.evaluate
    needs: [prepare, weak]
    with: {{register_as: digits, min: {{test/accuracy: 0.01}}}}
  deploy:
    uses: serve.deploy
    needs: [gate]
    with:
      model: "models:/digits@champion"
      port: {port}
      proxy_location: HeadOnly      # both nodes are this machine: one proxy binds the port
      cpus_per_replica: 0.25
      max_batch_size: 8
      batch_wait_ms: 20
      follow_every_s: 0.5
      limits: {{max_items: 64, max_body_bytes: 65536, max_samples: 8}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A local two-node Ray cluster (1 CPU each) this process drives; Serve is shut down and
    the cluster stopped at the end."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the session's one-node Ray, if a test before started it
    nodes = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    try:
        nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, logging_level="WARNING")
        yield nodes
    finally:
        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        nodes.shutdown()


@pytest.fixture(scope="module")
def served(cluster, tmp_path_factory):
    """The pipeline's run: trained models, the champion, and the application it deployed."""
    from components.bundle import load_model
    from components.data.dataset import load_dataset_info, load_numpy

    tmp = tmp_path_factory.mktemp("serve")
    port = _free_port()
    path = tmp / "serve.yaml"
    path.write_text(PIPELINE.format(storage=tmp / "store", port=port))
    record = run_ok(spec.load(path))
    art = {name: Path(stage.artifact) for name, stage in record.stages.items()}
    x, y = load_numpy(art["prepare"], "test")
    return {
        "record": record,
        "store": tmp / "store",
        "uri": record.tracking,
        "url": f"http://127.0.0.1:{port}",
        "port": port,
        "cluster_address": cluster.address,
        "art": art,
        "x": x,
        "y": y,
        "stats": load_dataset_info(art["prepare"]).normalization,
        "weak": load_model(art["weak"]),
        "strong": load_model(art["strong"]),
    }


def post(url: str, **kwargs) -> requests.Response:
    return requests.post(url, timeout=60, **kwargs)


def offline(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label ids and probabilities of the offline model (``bundle.load_model``)."""
    p = np.asarray(model.probabilities(x), np.float64)
    return p.argmax(1), p


def _digest(artifact: Path) -> str:
    return json.loads((artifact / "manifest.json").read_text())["digest"]


def predict_all(url: str, x: np.ndarray, chunk: int = 24) -> tuple[list[dict], set[str]]:
    """POST /predict of ``x`` in chunks, eight at a time (so batches form), in order."""
    from concurrent.futures import ThreadPoolExecutor

    def one(start: int) -> tuple[list[dict], str]:
        r = post(f"{url}/predict", json={"inputs": x[start : start + chunk].tolist()})
        assert r.status_code == 200, r.text
        return r.json()["predictions"], r.headers["X-Model-Version"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(0, len(x), chunk)))
    return [p for chunk_answers, _ in answers for p in chunk_answers], {v for _, v in answers}


def test_the_deployed_champion_answers_as_the_offline_model(served):
    url, x = served["url"], served["x"]
    predictions, versions = predict_all(url, x)
    assert versions == {"1"}
    ids, probabilities = offline(served["weak"], x)
    assert [p["label_id"] for p in predictions] == ids.tolist()
    assert [p["label"] for p in predictions] == [str(i) for i in ids]
    got = np.asarray([p["probabilities"] for p in predictions])
    np.testing.assert_allclose(got, probabilities, atol=1e-5)

    # An image as PNG bytes: the server scales and normalizes it as the training data was.
    from PIL import Image

    from components.data import normalization

    unit = normalization.invert(x[:1], served["stats"])[0, 0]  # [0, 1] pixels, (H, W)
    raw = np.round(np.clip(unit, 0, 1) * 255).astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(raw, mode="L").save(png, format="PNG")
    r = post(f"{url}/predict", data=png.getvalue(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    expected = normalization.apply((raw / 255.0)[None, None], served["stats"])
    _, p = offline(served["weak"], expected)
    np.testing.assert_allclose(r.json()["predictions"][0]["probabilities"], p[0], atol=1e-5)

    # What is served, as the registry and the run know it.
    gate = served["record"].stages["gate"].metrics
    model = requests.get(f"{url}/model", timeout=30).json()
    assert (model["name"], model["version"], model["follows"]) == ("digits", "1", True)
    assert model["endpoint"] == "/predict" and model["component"] == "vision.train"
    assert model["metrics"]["test/accuracy"] == pytest.approx(gate["test/accuracy"])
    assert model["digest"] == _digest(served["art"]["weak"])
    assert model["batching"] == {"max_batch_size": 8, "batch_wait_ms": 20.0}
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok", "version": "1"}
    assert "swagger" in requests.get(f"{url}/docs", timeout=30).text.lower()
    api = requests.get(f"{url}/openapi.json", timeout=30).json()
    assert {"/predict", "/model", "/healthz"} <= set(api["paths"])
    deployed = json.loads((served["art"]["deploy"] / "deployment.json").read_text())
    assert deployed["url"] == url and deployed["version"] == "1"


def test_the_proxies_reach_the_replicas_over_grpc(served):
    """``deploy`` starts Serve's controller with RAY_SERVE_PROXY_USE_GRPC=1, and every proxy it
    starts (one per node here) inherits it."""
    import psutil

    proxies = []
    for proc in psutil.process_iter(["cmdline"]):
        if (proc.info["cmdline"] or [""])[0].startswith("ray::ProxyActor"):
            proxies.append(proc.environ().get("RAY_SERVE_PROXY_USE_GRPC"))
    assert proxies and set(proxies) == {"1"}, proxies


def test_mlflow_loads_the_registered_champion_with_its_own_loader(served):
    import mlflow

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(served["uri"])
    mlflow.set_registry_uri(served["uri"])
    try:
        loaded = mlflow.pyfunc.load_model("models:/digits@champion")
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    x = served["x"]
    answer = loaded.predict(x)
    ids, probabilities = offline(served["weak"], x)
    assert answer["label_id"].tolist() == ids.tolist()
    np.testing.assert_allclose(np.stack(answer["probabilities"]), probabilities, atol=1e-6)
    inputs = loaded.metadata.get_input_schema().inputs[0]
    assert list(inputs.shape) == [-1, *x.shape[1:]]
    assert loaded.metadata.metadata["raypipe"]["stage"] == "weak"


def _bad_requests(url: str, x: np.ndarray) -> list[tuple[str, requests.Response, int, str]]:
    item = x[0].tolist()
    with_nan = x[:1].copy()
    with_nan[0, 0, 0, 0] = np.nan
    nan = json.dumps({"inputs": with_nan.tolist()})  # JSON's NaN literal, as JavaScript sends
    zeros = np.zeros_like(x[0], dtype=int).tolist()
    big = b'{"inputs": [' + b"0," * 40_000 + b"0]}"
    return [
        ("wrong shape", post(f"{url}/predict", json={"inputs": [[1.0, 2.0]]}), 422, "shape"),
        ("wrong dtype", post(f"{url}/predict", json={"inputs": [[["a"] * 8] * 8]}), 422, "numbers"),
        (
            "NaN",
            post(f"{url}/predict", data=nan, headers={"Content-Type": "application/json"}),
            422,
            "NaN",
        ),  # fmt: skip
        ("too many", post(f"{url}/predict", json={"inputs": [zeros] * 65}), 422, "at most 64"),
        ("too big", post(f"{url}/predict", data=big), 413, "over the limit"),
        (
            "not an image",
            post(f"{url}/predict", data=b"\x89PNGnope", headers={"Content-Type": "image/png"}),
            400,
            "not an image",
        ),  # fmt: skip
        ("not JSON", post(f"{url}/predict", data=b"{inputs"), 400, "not JSON"),
        ("unknown field", post(f"{url}/predict", json={"inputs": [item], "k": 1}), 422, "'k'"),
        ("no endpoint", post(f"{url}/sample", json={"n": 1}), 404, ""),
    ]


def test_bad_requests_get_a_4xx_and_one_line_and_the_replica_serves_on(served):
    url, x = served["url"], served["x"]
    for what, r, status, fragment in _bad_requests(url, x):
        assert r.status_code == status, (what, r.status_code, r.text)
        reason = r.json()["error"]
        assert fragment in reason and "\n" not in reason, (what, reason)
    r = post(f"{url}/predict", json={"inputs": x[:3].tolist()})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 3


def test_the_cli_serves_a_runs_generator_beside_it(served):
    """`raypipe serve RUN_ID/vae --ray-address ...` deploys onto the running cluster (its
    Serve, its proxy) and returns; /sample draws the class asked for, refuses unknown labels."""
    url, record = served["url"], served["record"]
    args = [f"{record.run_id}/vae", "--ray-address", served["cluster_address"]]
    done = cli(
        "serve",
        *args,
        "--storage",
        str(served["store"]),
        "--port",
        str(served["port"]),
        "--name",
        "vae",
        "--route-prefix",
        "/vae",
        "--cpus-per-replica",
        "0.25",
        env=cli_env(),
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"at {url}/vae" in done.stdout and "POST" in done.stdout
    vae = f"{url}/vae"
    model = requests.get(f"{vae}/model", timeout=30).json()
    assert model["endpoint"] == "/sample" and model["stage"] == "vae"
    r = post(f"{vae}/sample", json={"n": 3, "label": "7", "format": "json", "seed": 1})
    assert r.status_code == 200, r.text
    from components.bundle import load_model
    from components.serve.settings import Limits  # the CLI's application: default limits

    expected = load_model(served["art"]["vae"]).sample(3, 7, 1)
    np.testing.assert_allclose(np.asarray(r.json()["images"]), expected, atol=1e-5)
    png = post(f"{vae}/sample", json={"n": 4, "label": 2})
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    for body, status, fragment in [
        ({"n": 1, "label": "cat"}, 422, "unknown label 'cat'"),
        ({"n": 1, "label": 10}, 422, "unknown label 10"),
        ({"n": Limits().max_samples + 1}, 422, f"at most {Limits().max_samples}"),
        ({"n": 0}, 422, "n:"),
        ({"n": 1, "color": "red"}, 422, "color"),
        # a body that is not valid Unicode (a JSON "\ud800" escape)
        ({"n": 1, "\ud800": 2}, 422, "unicode"),
    ]:
        r = post(f"{vae}/sample", json=body)
        assert r.status_code == status and fragment in r.json()["error"], (body, r.text)
    # The digits application was not touched by deploying another beside it.
    assert requests.get(f"{url}/healthz", timeout=30).json()["version"] == "1"


def test_a_replica_takes_enough_requests_that_the_router_does_not_back_off():
    """Serve's router retries a request with a growing backoff when every replica is full:
    unbatched, the old default (twice max_batch_size: 2) served 32 clients at 10.8 requests/s
    with a 5.5 s p99. The default is now at least MIN_ONGOING; a set value stands."""
    from components.serve.settings import MIN_ONGOING, ServeSettings

    assert MIN_ONGOING >= 32
    for batch, expected in [(1, MIN_ONGOING), (32, MIN_ONGOING), (64, 128)]:
        options = ServeSettings(max_batch_size=batch).deployment_options()
        assert options["max_ongoing_requests"] == expected, batch
    options = ServeSettings(max_batch_size=1, max_ongoing_requests=4).deployment_options()
    assert options["max_ongoing_requests"] == 4
    with pytest.raises(ValueError, match="below max_batch_size"):
        ServeSettings(max_batch_size=8, max_ongoing_requests=4)


def test_a_text_that_is_not_unicode_is_refused_alone_not_failing_its_batch():
    """A JSON "\\ud800" escape parses to a string no tokenizer encodes: the request that holds
    it gets a 422 naming the item, before it can join (and fail) a batch of other requests."""
    from components.serve.interface import BadRequest, TextInputs
    from components.serve.settings import Limits

    inputs = TextInputs({"type": "text"})
    part = inputs.from_json(json.loads('["fine", "caf\\u00e9 \\ud83d\\ude00"]'), Limits())
    assert part.data == ["fine", "caf\u00e9 \U0001f600"]  # an escaped pair is one character
    with pytest.raises(BadRequest) as refused:
        inputs.from_json(json.loads('["fine", "bad \\ud800 text"]'), Limits())
    assert refused.value.status == 422
    assert refused.value.reason == (
        "inputs[1]: not valid Unicode: a lone surrogate U+D800 at character 4"
    )


def test_deploy_refuses_an_unknown_model_and_a_second_port_in_one_line(served):
    from components.serve.deploy import deploy
    from components.serve.settings import ServeSettings

    settings = ServeSettings(port=served["port"], tracking_uri=served["uri"])
    with pytest.raises(LookupError, match=r"models:/digits@nope: the registry at .* has no"):
        deploy("models:/digits@nope", settings)
    other = settings.model_copy(update={"port": served["port"] + 1, "name": "other"})
    with pytest.raises(RuntimeError, match=f"proxy on 127.0.0.1:{served['port']}"):
        deploy("models:/digits@champion", other)


def test_a_gate_moves_the_alias_under_load_and_no_request_fails(served):
    """Eight clients ask without pause while the gate registers the strong model and moves
    `champion` to it: every request succeeds, each client sees version 1 then 2 (never back),
    and version 2's answers are the strong model's."""
    from components.tune.evaluate import EvaluateConfig, gate

    url, x = served["url"], served["x"][:16]
    seen: list[list[str]] = [[] for _ in range(8)]
    failures: list[str] = []
    stop = threading.Event()

    def client(i: int) -> None:
        with requests.Session() as s:
            while not stop.is_set():
                try:
                    r = s.post(f"{url}/predict", json={"inputs": x[i : i + 2].tolist()}, timeout=60)
                except requests.RequestException as e:
                    failures.append(repr(e))
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")
                else:
                    seen[i].append(r.headers["X-Model-Version"])

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(seen), 60, "every client's first answer")
        strong = served["record"].stages["strong"]
        decision = gate(
            served["uri"],
            "digits",
            strong.artifact,
            strong.metrics,
            EvaluateConfig(register_as="digits", metric="test/accuracy"),
            tags={
                "raypipe.run_id": served["record"].run_id,
                "raypipe.stage": "strong",
                "raypipe.digest": _digest(served["art"]["strong"]),
            },
            log_model=True,
        )
        assert decision.promoted and decision.version == "2", decision
        wait_for(lambda: all(s[-1] == "2" for s in seen), 120, "every client on version 2")
        time.sleep(0.5)  # a few more answers from version 2
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=70)
    assert not failures, failures[:5]
    for versions in seen:
        assert "1" in versions and versions[-1] == "2"
        assert versions == sorted(versions), "a client went back to version 1"
    predictions, versions = predict_all(url, served["x"][:48])
    assert versions == {"2"}
    ids, probabilities = offline(served["strong"], served["x"][:48])
    assert [p["label_id"] for p in predictions] == ids.tolist()
    np.testing.assert_allclose([p["probabilities"] for p in predictions], probabilities, atol=1e-5)
    model = requests.get(f"{url}/model", timeout=30).json()
    assert model["version"] == "2" and model["stage"] == "strong"
    assert model["digest"] == _digest(served["art"]["strong"])
    assert [(s["from"], s["to"]) for s in model["follow"]["swaps"]] == [("1", "2")]


def test_a_cached_deploy_stands_while_its_application_runs_and_deploys_again_once_deleted(
    served,
):
    """Run again with the application up: every stage is cached, the deploy too. Delete the
    application (`serve delete`), run again: the deploy stage, and only it, runs, says why, and
    the champion answers again."""
    from ray import serve

    path = served["store"].parent / "serve.yaml"
    again = run_ok(spec.load(path))
    assert all(stage.cache_hit for stage in again.stages.values()), again.stages
    before = post(f"{served['url']}/predict", json={"inputs": served["x"][:4].tolist()})
    assert before.status_code == 200, before.text
    champion = before.headers["X-Model-Version"]  # 2 once the swap test has moved the alias
    serve.delete("digits")
    wait_for(lambda: "digits" not in serve.status().applications, 60, "the app deleted")
    redeployed = run_ok(spec.load(path))
    deploy = redeployed.stages["deploy"]
    assert not deploy.cache_hit and "'digits' is not on this cluster" in deploy.recomputed_because
    assert all(s.cache_hit for name, s in redeployed.stages.items() if name != "deploy")
    r = post(f"{served['url']}/predict", json={"inputs": served["x"][:4].tolist()})
    assert r.status_code == 200 and r.headers["X-Model-Version"] == champion, r.text
