"""DDPG / TD3 (raypipe, RLlib) against Stable-Baselines3 DDPG on Pendulum-v1; prints JSON.

    python benchmarks/rl.py --seeds 0 1 2 --out rl.json    # the full figures (~1 h on 2 cores)
    python benchmarks/rl.py --seeds 0 --steps 1000 2000 --learning-starts 500   # a smoke run
    python benchmarks/rl.py --stage 2      # `raypipe run pipelines/ddpg.yaml` (10k steps) vs SB3
                                           # (both with as many torch threads as CPUs)

All runs use rl-baselines3-zoo's Pendulum settings (gamma 0.98, buffer 200k, learning_starts
10k, Gaussian noise 0.1, lr 1e-3, [400, 300], batch 256, tau 0.005, one gradient step per env
step; TD3 adds policy delay 2 and target smoothing 0.2 / 0.5). Every agent is evaluated by the
same code: 10 deterministic episodes (env seeds 1000..1009) at each checkpoint step. Wall times
count training only (evaluation excluded). Throughput is env steps/s over the learning phase
(after learning_starts), with one update per env step. Needs the dev extra `stable-baselines3`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from benchmarks.figures import spread  # noqa: E402

ZOO = dict(
    gamma=0.98,
    buffer_size=200_000,
    learning_starts=10_000,
    noise=0.1,
    lr=1e-3,
    hiddens=[400, 300],
    batch_size=256,
    tau=0.005,
)
EVAL_EPISODES = 10
GOAL = -200.0


def evaluate(act, episodes: int = EVAL_EPISODES) -> list[float]:
    """Deterministic returns of ``act(obs) -> env action`` on Pendulum-v1 (fixed env seeds)."""
    env = gym.make("Pendulum-v1")
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=1000 + i)
        done, total = False, 0.0
        while not done:
            obs, r, term, trunc, _ = env.step(act(obs))
            total, done = total + float(r), term or trunc
        returns.append(total)
    env.close()
    return returns


def run_raypipe(algo_name: str, seed: int, checkpoints: list[int], fast: bool = True) -> dict:
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME

    from components.rl.algorithm import DDPGConfig, TD3Config

    config = (TD3Config() if algo_name == "td3" else DDPGConfig()).environment("Pendulum-v1")
    config = (
        config.env_runners(num_env_runners=0, rollout_fragment_length=8)
        .training(
            gamma=ZOO["gamma"],
            replay_buffer_config={"type": "EpisodeReplayBuffer", "capacity": ZOO["buffer_size"]},
            num_steps_sampled_before_learning_starts=ZOO["learning_starts"],
            noise_sigma=ZOO["noise"],
            actor_lr=ZOO["lr"],
            critic_lr=ZOO["lr"],
            actor_hiddens=ZOO["hiddens"],
            critic_hiddens=ZOO["hiddens"],
            train_batch_size_per_learner=ZOO["batch_size"],
            tau=ZOO["tau"],
            fast_replay=fast,
        )
        .reporting(min_sample_timesteps_per_iteration=1000)
        .debugging(seed=seed)
    )
    algo = config.build_algo()
    learner = algo.learner_group._learner
    actor = learner.module[DEFAULT_MODULE_ID].actor
    low, high = -2.0, 2.0

    def act(obs):
        with torch.no_grad():
            a = actor(torch.as_tensor(obs, dtype=torch.float32)).numpy()
        return np.clip(low + (a + 1) * 0.5 * (high - low), low, high)

    points, train_time, learn_time, learn_steps = [], 0.0, 0.0, 0
    steps = 0
    for target in checkpoints:
        while steps < target:
            t = time.perf_counter()
            algo.train()
            dt = time.perf_counter() - t
            new = int(algo.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME)))
            train_time += dt
            if steps >= ZOO["learning_starts"]:
                learn_time, learn_steps = learn_time + dt, learn_steps + new - steps
            steps = new
        returns = evaluate(act)
        points.append(_point(steps, returns, train_time))
    algo.stop()
    return _summary(points, learn_steps, learn_time)


def run_sb3(seed: int, checkpoints: list[int]) -> dict:
    from stable_baselines3 import DDPG
    from stable_baselines3.common.noise import NormalActionNoise

    env = gym.make("Pendulum-v1")
    model = DDPG(
        "MlpPolicy",
        env,
        learning_rate=ZOO["lr"],
        buffer_size=ZOO["buffer_size"],
        learning_starts=ZOO["learning_starts"],
        batch_size=ZOO["batch_size"],
        tau=ZOO["tau"],
        gamma=ZOO["gamma"],
        action_noise=NormalActionNoise(np.zeros(1), ZOO["noise"] * np.ones(1)),
        policy_kwargs=dict(net_arch=ZOO["hiddens"]),
        seed=seed,
        device="cpu",
    )
    points, train_time, learn_time, learn_steps, steps = [], 0.0, 0.0, 0, 0
    for target in checkpoints:
        # Split at learning_starts so the learning-phase throughput is measured apart.
        for stop in sorted({s for s in (ZOO["learning_starts"], target) if steps < s <= target}):
            t = time.perf_counter()
            model.learn(stop - steps, reset_num_timesteps=False)
            dt = time.perf_counter() - t
            train_time += dt
            if steps >= ZOO["learning_starts"]:
                learn_time, learn_steps = learn_time + dt, learn_steps + stop - steps
            steps = stop
        returns = evaluate(lambda obs: model.predict(obs, deterministic=True)[0])
        points.append(_point(steps, returns, train_time))
    return _summary(points, learn_steps, learn_time)


def throughput(steps: int, rounds: int) -> dict:
    """Learning-phase env steps/s (one update per step, zoo networks), interleaved A/B/C rounds.

    Each agent first fills 1,000 random steps, then the timed part is ``steps`` env steps with
    one gradient step each. Rounds alternate the agents so that machine load drifts hit all.
    """
    saved = ZOO["learning_starts"]
    ZOO["learning_starts"] = 1000
    agents = {
        "ddpg": lambda: run_raypipe("ddpg", 0, [1000 + steps]),
        "ddpg_rllib_replay": lambda: run_raypipe("ddpg", 0, [1000 + steps], fast=False),
        "sb3": lambda: run_sb3(0, [1000 + steps]),
    }
    speeds: dict[str, list[float]] = {name: [] for name in agents}
    for _ in range(rounds):
        for name, run in agents.items():
            speeds[name].append(run()["learning_env_steps_per_s"])
    ZOO["learning_starts"] = saved
    out = {name: {"per_round": v, "median": float(np.median(v))} for name, v in speeds.items()}
    for name in ("ddpg", "ddpg_rllib_replay"):
        out[name]["ratio_vs_sb3"] = out[name]["median"] / out["sb3"]["median"]
        per_round = [a / b for a, b in zip(speeds[name], speeds["sb3"], strict=True)]
        out[name]["ratio_per_round"] = spread(per_round)
    return out


PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "ddpg.yaml"


def stage_against_sb3(rounds: int, threads: int, timesteps: int = 10_000) -> dict:
    """The ``rl.ddpg`` stage as a user runs it against SB3's ``learn()`` with its settings.

    Each round runs ``raypipe run pipelines/ddpg.yaml agent.timesteps=N
    agent.learner_cpus=THREADS`` in a fresh process (fresh storage: no cache) and reads the
    stage's own training time from the run record (``train/time_s``: its sampling, updates and
    checkpoints; the evaluations it runs every 5k steps are ``eval/time_s``, apart); its
    exported policy is evaluated by :func:`evaluate`. Then SB3 DDPG with the pipeline's
    settings (learning after 1,000 steps, seed 0) learns as many steps in this process with as
    many torch threads, timed around ``learn()`` alone, and is evaluated by the same function.
    """
    import subprocess
    import tempfile

    import yaml

    from components.rl.policy import load_policy
    from components.training import torch_threads

    stage = yaml.safe_load(PIPELINE.read_text())["stages"]["agent"]["with"]
    rounds_out = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="raypipe-rl-bench-") as tmp:
            started = time.perf_counter()
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pipelines.cli",
                    "run",
                    str(PIPELINE),
                    f"agent.timesteps={timesteps}",
                    f"agent.learner_cpus={threads}",
                    f"storage={tmp}",
                ],
                cwd=Path(__file__).resolve().parents[1],
                capture_output=True,
                text=True,
                check=False,
            )
            wall = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(f"raypipe run failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
            (record,) = Path(tmp, "runs").glob("*/run.json")
            agent = json.loads(record.read_text())["stages"]["agent"]
            metrics = agent["metrics"]
            returns = evaluate(load_policy(Path(agent["artifact"])))
        saved = ZOO["learning_starts"]
        ZOO["learning_starts"] = stage["learning_starts"]
        torch.manual_seed(stage["seed"])
        with torch_threads(threads):
            sb3 = run_sb3(stage["seed"], [timesteps])
        ZOO["learning_starts"] = saved
        rounds_out.append(
            {
                "raypipe_train_s": round(metrics["train/time_s"], 2),
                "raypipe_eval_s": round(metrics["eval/time_s"], 2),
                "raypipe_torch_threads": metrics["train/torch_threads"],
                "raypipe_run_wall_s": round(wall, 2),
                "raypipe_eval_return": float(np.mean(returns)),
                "sb3_learn_s": sb3["points"][-1]["train_wall_s"],
                "sb3_eval_return": sb3["points"][-1]["return_mean"],
            }
        )
        print(json.dumps(rounds_out[-1]), flush=True)
    speedups = [r["sb3_learn_s"] / r["raypipe_train_s"] for r in rounds_out]
    return {
        "timesteps": timesteps,
        "torch_threads": threads,
        "rounds": rounds_out,
        "speedup_vs_sb3": spread(speedups),
    }


def _point(steps: int, returns: list[float], train_time: float) -> dict:
    return {
        "env_steps": steps,
        "return_mean": float(np.mean(returns)),
        "return_std": float(np.std(returns)),
        "train_wall_s": round(train_time, 2),
    }


def _summary(points: list[dict], learn_steps: int, learn_time: float) -> dict:
    reach = next((p["train_wall_s"] for p in points if p["return_mean"] >= GOAL), None)
    return {
        "points": points,
        "learning_env_steps_per_s": learn_steps / learn_time if learn_time else None,
        "wall_s_to_reach_-200": reach,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, nargs="+", default=[5000, 10000, 20000])
    parser.add_argument(
        "--algos", nargs="+", default=["ddpg", "td3", "sb3"], choices=["ddpg", "td3", "sb3"]
    )
    parser.add_argument("--rllib-replay", action="store_true", help="also RLlib's episode replay")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--learning-starts", type=int, default=ZOO["learning_starts"])
    parser.add_argument(
        "--throughput-only",
        type=int,
        metavar="STEPS",
        default=0,
        help="only measure learning throughput over STEPS env steps (3 interleaved rounds)",
    )
    parser.add_argument(
        "--stage",
        type=int,
        metavar="ROUNDS",
        default=0,
        help="only time the rl.ddpg stage as `raypipe run` runs it against SB3 (ROUNDS rounds)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="with --stage: the stage's learner_cpus and SB3's torch threads (default: all CPUs)",
    )
    args = parser.parse_args()
    ZOO["learning_starts"] = args.learning_starts

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if args.stage:  # the pipeline's own process starts its Ray; SB3 needs none
        report = {"benchmark": "rl-stage", "stage": stage_against_sb3(args.stage, args.threads)}
        print(json.dumps(report, indent=2))
        return
    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    if args.throughput_only:
        report = {"benchmark": "rl-throughput", "throughput": throughput(args.throughput_only, 3)}
        print(json.dumps(report, indent=2))
        return
    runs: dict[str, dict[str, dict]] = {}
    for seed in args.seeds:
        for name in args.algos:
            torch.manual_seed(seed)
            if name == "sb3":
                result = run_sb3(seed, args.steps)
            else:
                result = run_raypipe(name, seed, args.steps)
            runs.setdefault(name, {})[str(seed)] = result
            print(json.dumps({"algo": name, "seed": seed, **result}), flush=True)
        if args.rllib_replay:
            result = run_raypipe("ddpg", seed, args.steps, fast=False)
            runs.setdefault("ddpg_rllib_replay", {})[str(seed)] = result
            print(json.dumps({"algo": "ddpg_rllib_replay", "seed": seed, **result}), flush=True)

    summary = {}
    for name, by_seed in runs.items():
        at = {}
        for step in args.steps:
            vals = [
                p["return_mean"]
                for r in by_seed.values()
                for p in r["points"]
                if p["env_steps"] >= step and p["env_steps"] < step + 1000
            ]
            at[str(step)] = {"mean": float(np.mean(vals)), "per_seed": vals}
        speeds = [r["learning_env_steps_per_s"] for r in by_seed.values()]
        reach = [r["wall_s_to_reach_-200"] for r in by_seed.values()]
        summary[name] = {
            "eval_return": at,
            "learning_env_steps_per_s": float(np.mean(speeds)),
            "wall_s_to_reach_-200": reach,
        }
    if "sb3" in summary:
        sb3 = summary["sb3"]
        for name, s in summary.items():
            if name == "sb3":
                continue
            s["throughput_ratio_vs_sb3"] = (
                s["learning_env_steps_per_s"] / sb3["learning_env_steps_per_s"]
            )
            pairs = [
                (a, b)
                for a, b in zip(s["wall_s_to_reach_-200"], sb3["wall_s_to_reach_-200"], strict=True)
                if a and b
            ]
            s["reach_time_ratio_vs_sb3"] = (
                float(np.mean([a / b for a, b in pairs])) if pairs else None
            )
    goals = {}
    for name in ("ddpg", "td3"):
        if name in summary and "10000" in summary[name]["eval_return"]:
            goals[name] = {
                "-200_by_10k_every_seed": all(
                    v >= -200 for v in summary[name]["eval_return"]["10000"]["per_seed"]
                ),
                "-160_at_20k": summary[name]["eval_return"].get("20000", {}).get("mean", -1e9)
                >= -160,
            }
    report = {
        "benchmark": "rl",
        "env": "Pendulum-v1",
        "settings": ZOO,
        "eval_episodes": EVAL_EPISODES,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
        },
        "summary": summary,
        "goals": goals,
        "runs": runs,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
