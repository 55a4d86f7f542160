"""The cluster that the pipeline tests share (one `raypipe cluster up` for the session)."""

from __future__ import annotations

import pytest
from cluster_helpers import cli, cli_env, output

from pipelines import localcluster


@pytest.fixture(scope="session")
def pipeline_cluster(tmp_path_factory):
    """`raypipe cluster up --workers 1 --worker-cpus 4`, as a new user starts it.

    The head keeps the default 1 CPU: with the default `--driver-cpus 0.25` a job's driver
    sits there, and so do its stages' 0-CPU tasks, on a node that cannot take one more 1-CPU
    task (where data.prepare once waited for ever). The worker's 4 logical CPUs leave room
    for several shrunk pipelines at once. Jobs find it through `RAYPIPE_CLUSTER_DIR`.

    The nodes start without the suite's test components (``RAYPIPE_COMPONENTS``): a job's
    driver inherits its node's environment, and the shipped pipelines need none of them (a
    submission from the image's install, which has no ``tests`` package, must not be told to
    import one).
    """
    state = tmp_path_factory.mktemp("pipeline-cluster")
    env = cli_env(RAYPIPE_CLUSTER_DIR=str(state))
    env.pop("RAYPIPE_COMPONENTS", None)
    try:
        up = cli("cluster", "up", "--workers", "1", "--worker-cpus", "4", env=env, timeout=400)
        assert up.returncode == 0, output(up)
        info = localcluster.load(state)
        assert up.stdout.splitlines()[-1] == f"export RAYPIPE_ADDRESS={info.dashboard_url}"
        yield {"info": info, "env": env, "tmp": tmp_path_factory.mktemp("pipelines"), "up": up}
    finally:
        localcluster.down(state)
