"""Token authentication (`RAY_AUTH_MODE=token`): without the token a submission fails clearly;
with it (from a file or the environment) it works; the token is never printed or recorded."""

from __future__ import annotations

import json
import secrets

import pytest
from cluster_helpers import PIPELINE, cli, cli_env, output, submitted_id

from pipelines import localcluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    """A one-node cluster started with token auth; its token lives in a file of a temp HOME."""
    home = tmp_path_factory.mktemp("home")
    token = secrets.token_hex(16)
    token_file = home / "cluster-token"
    token_file.write_text(token + "\n")
    state = tmp_path_factory.mktemp("token-cluster")
    env = cli_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), HOME=str(home))
    try:
        info = localcluster.up(0, state_dir=state, env=env)
        yield {
            "info": info,
            "token": token,
            "token_file": token_file,
            "home": home,
            "tmp": tmp_path_factory.mktemp("t"),
        }
    finally:
        localcluster.down(state)


def _no_token_env(c, **extra):
    # An empty HOME: no ~/.ray/auth_token to fall back on.
    return cli_env(HOME=str(c["tmp"]), **extra)


@pytest.mark.reliability
def test_without_the_token_submission_fails_clearly(token_cluster):
    c = token_cluster
    url = c["info"].dashboard_url
    for mode in ("disabled", "token"):
        result = cli("submit", PIPELINE, "--address", url, env=_no_token_env(c, RAY_AUTH_MODE=mode))
        assert result.returncode == 2, output(result)
        assert "requires token authentication and no token was sent" in result.stderr
        assert "RAY_AUTH_TOKEN" in result.stderr
    wrong = cli(
        "jobs", "list", "--address", url, env=_no_token_env(c, RAY_AUTH_TOKEN=secrets.token_hex(16))
    )
    assert wrong.returncode == 2 and "rejected the authentication token" in wrong.stderr


@pytest.mark.reliability
def test_with_the_token_it_works_and_the_token_is_never_shown(token_cluster):
    c = token_cluster
    url = c["info"].dashboard_url
    store = c["tmp"] / "store"  # one node: an absolute local path is fine
    from_file = _no_token_env(c, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(c["token_file"]))
    submitted = cli(
        "submit", PIPELINE, f"storage={store}", "--address", url, "--wait", env=from_file
    )
    assert submitted.returncode == 0, output(submitted)
    job = submitted_id(submitted)
    from_env = _no_token_env(c, RAY_AUTH_TOKEN=c["token"])  # RAY_AUTH_MODE=disabled here
    outputs = [output(submitted)]
    for args in (["status", job, "--json"], ["logs", job], ["list"]):
        result = cli("jobs", *args, "--address", url, env=from_env)
        assert result.returncode == 0, output(result)
        outputs.append(output(result))
    assert json.loads(outputs[1])["status"] == "SUCCEEDED"
    assert "run " in outputs[2] and "succeeded" in outputs[2]
    assert job in outputs[3]
    token = c["token"]
    assert not [o for o in outputs if token in o]
    files = [p for p in store.rglob("*") if p.is_file()]
    assert any(p.name == "run.json" for p in files)
    assert not [p for p in files if token.encode() in p.read_bytes()]
    # Nor is it in what the cluster keeps about the job (runtime_env, metadata, entrypoint).
    assert token not in outputs[1]
