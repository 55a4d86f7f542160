"""`raypipe rollout` on an rl.ddpg stage trained through the engine."""

from __future__ import annotations

from typer.testing import CliRunner

from pipelines import engine, spec
from pipelines.cli import app


def test_rollout_command_prints_returns_and_names_bad_stages(ray_local, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        f"name: rl-cli\nstorage: {tmp_path / 'store'}\nstages:\n"
        "  agent:\n    uses: rl.ddpg\n"
        "    with: {env: Pendulum-v1, timesteps: 200, hiddens: [16], batch_size: 32,\n"
        "           learning_starts: 50, eval_every: 200, eval_episodes: 1, env_runners: 0}\n"
        "  other: {uses: test.sleep}\n"
    )
    record = engine.run_pipeline(spec.load(path), printer=lambda _line: None)
    assert record.ok, record.error
    store = str(tmp_path / "store")
    runner = CliRunner()
    out = tmp_path / "rollout.png"
    args = ["rollout", record.run_id, "agent", "--episodes", "2", "--video", "--out", str(out)]
    result = runner.invoke(app, [*args, "--storage", store])
    assert result.exit_code == 0, result.output
    assert result.output.count("episode ") == 2 and "mean return over 2 episodes" in result.output
    assert out.stat().st_size > 1000  # no renderer here: a plot of the episode
    wrong = runner.invoke(app, ["rollout", record.run_id, "other", "--storage", store])
    assert wrong.exit_code == 2 and "is a test.sleep stage" in wrong.output
    missing = runner.invoke(app, ["rollout", record.run_id, "nope", "--storage", store])
    assert missing.exit_code == 2 and "has no stage 'nope'" in missing.output
