"""``tune.search``: Ray Tune over any trainable component (one whose family declares its hooks,
``components/contract.py``: ``vision.train``, ``generative.vae``, ``generative.gan``,
``rl.ddpg``, ...). This module knows no family: it asks the registry for the hooks.

Each trial is a function that validates its sampled config against the trainable's own Config.
A Ray Train family's trial then builds and fits a ``TorchTrainer`` running the family's
unchanged ``train_func`` (the Ray 2.60 way: ``Tuner(trainer)`` is deprecated), and a
``TuneReportCallback`` forwards every epoch's report to Tune, so ASHA can stop a poor trial
after any epoch. A family with a trial function of its own (``rl.ddpg``: an RLlib algorithm in
the trial's process) reports each evaluation, which counts as an epoch.

The artifact: ``results.parquet`` and ``results.csv`` (one row per trial: status, config,
final metrics, error), ``best_config.json``, the best trial's checkpoint (``checkpoint/``) and
its model bundle exported as the family exports it, so ``tune.evaluate``, ``raypipe sample``,
``rollout`` and ``serve`` take it like the trainable's own artifact (same kind, same bundle).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from components import registry
from components.api import Component, StageContext, StrictModel
from components.tune.space import Dimension, check_space

RESULTS_FILE = "results.parquet"
BEST_FILE = "best_config.json"
CHECKPOINT_DIR = "checkpoint"
TRIAL_DRIVER_MEMORY = 256 * 1024**2
#: Trials one search may sample: Tune keeps every trial's state in the driver.
MAX_SAMPLES = 10_000


class SearchConfig(StrictModel):
    """Settings of ``tune.search``.

    Attributes:
        trainable: the component whose ``train_func`` every trial runs.
        train: the trainable's ``with:`` settings every trial starts from (e.g. ``epochs``).
        search: ``random`` sampling, ``grid`` (every dimension a ``grid``: runs exactly the
            grid) or ``optuna`` (Optuna's TPE, model-based; no ``grid`` dimensions).
        samples: trials to sample (``random``, ``optuna``; default 8) or passes over the grid
            (``grid``; default 1); at most ``MAX_SAMPLES``.
        space: the searched ``with:`` keys of the trainable (see ``components/tune/space.py``).
        scheduler: ``asha`` stops poor trials at epoch milestones; ``fifo`` runs all to the end.
        grace_period: epochs every trial runs before ASHA may stop it.
        reduction_factor: ASHA keeps the best 1/``reduction_factor`` at each milestone.
        metric: the per-epoch metric that ranks trials (validation, never test); default: the
            trainable's first (``val/accuracy``, ``val/elbo``, ``val/fd_classifier``,
            ``eval/episode_return_mean``).
        mode: whether ``metric`` is maximized or minimized; default: the metric's own way.
        time_budget_s: stops the search after this many seconds (trials running are stopped).
        max_concurrent_trials: trials at once; default: as many as the cluster's CPUs (and GPUs)
            hold, each trial taking ``resources.workers * resources.cpus_per_worker`` CPUs (an
            ``rl.ddpg`` trial: one, plus one per env runner).
        seed: seeds the sampler (random and Optuna), so the same config samples the same trials.
    """

    trainable: str = "vision.train"
    train: dict[str, Any] = Field(default_factory=dict)
    search: Literal["random", "grid", "optuna"] = "random"
    samples: int | None = Field(None, ge=1, le=MAX_SAMPLES)
    space: dict[str, Any]
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1)
    metric: str
    mode: Literal["max", "min"]
    time_budget_s: float | None = Field(None, gt=0)
    max_concurrent_trials: int | None = Field(None, ge=1)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _default_metric(cls, data: Any) -> Any:
        """The trainable's first epoch metric, and the way that metric is better."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        trainable = _hooks_or_none(data.get("trainable", "vision.train"))
        if "metric" not in data and trainable is not None:
            data["metric"] = next(iter(trainable.epoch_metrics))
        metric = data.get("metric")
        if "mode" not in data and isinstance(metric, str):
            # The trainable's own families first: asking every family imports every component.
            own = trainable.metric_modes if trainable is not None else {}
            data["mode"] = own.get(metric) or registry.metric_modes().get(metric, "max")
        return data

    @field_validator("trainable")
    @classmethod
    def _known_trainable(cls, value: str) -> str:
        try:
            registry.trainable(value)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        return value

    @field_validator("train")
    @classmethod
    def _train_settings(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "trainable" in info.data:
            registry.get(info.data["trainable"]).Config.model_validate(value)
        return value

    @field_validator("space")
    @classmethod
    def _space(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "trainable" not in info.data or "train" not in info.data:
            return value
        if not value:
            raise ValueError("the space needs at least one key")
        model = registry.get(info.data["trainable"]).Config
        check_space(value, model, info.data["train"])
        search = info.data.get("search")
        for key, dim in value.items():
            if search == "grid" and "grid" not in dim:
                raise ValueError(f"search: grid needs every dimension as a grid; {key} is not")
            if search == "optuna" and "grid" in dim:
                raise ValueError(f"search: optuna samples; {key} is a grid (use choice)")
        return value

    @field_validator("metric")
    @classmethod
    def _reported_metric(cls, value: str, info: ValidationInfo) -> str:
        if "trainable" in info.data:
            reported = registry.trainable(info.data["trainable"]).epoch_metrics
            if value not in reported:
                raise ValueError(f"not reported every epoch; one of: {', '.join(reported)}")
        return value

    @model_validator(mode="after")
    def _bounded_trials(self) -> SearchConfig:
        grids = [len(dim["grid"]) for dim in self.space.values() if dim.get("grid")]
        trials = self.num_samples() * math.prod(grids)
        if trials > MAX_SAMPLES:
            raise ValueError(
                f"{trials:,} trials (samples x every grid's values); a search runs at most "
                f"{MAX_SAMPLES:,}"
            )
        return self

    def dimensions(self) -> dict[str, Dimension]:
        return {key: Dimension.model_validate(dim) for key, dim in self.space.items()}

    def num_samples(self) -> int:
        return self.samples or (1 if self.search == "grid" else 8)

    def max_epochs(self) -> int:
        """The most epochs (evaluations, for RL) a trial can run: ASHA's budget."""
        trainable, dims = registry.trainable(self.trainable), self.dimensions()
        largest = {key: dims[key].largest() for key in trainable.budget_keys if key in dims}
        return trainable.budget(self.trainable_config(largest))

    def trainable_config(self, params: dict[str, Any] | None = None) -> StrictModel:
        """The trainable's config of a trial with sampled ``params``."""
        return registry.get(self.trainable).Config.model_validate({**self.train, **(params or {})})


def _hooks_or_none(name: Any):
    """The family hooks of ``name``, or None when it has none (validation says why later)."""
    try:
        return registry.trainable(name)
    except (KeyError, ValueError, TypeError):
        return None


# --- one trial ------------------------------------------------------------------------------


def _report_callback(epoch_metric: str):
    """A ``TuneReportCallback`` that counts epochs and carries the last epoch's metrics into
    later reports (the final test report has no validation metrics; Tune wants the ranking
    metric in every result)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class CarryForward(TuneReportCallback):
        def __init__(self):
            super().__init__()
            self.last: dict[str, Any] = {"epochs_done": 0}

        def after_report(self, run_context, metrics, checkpoint):
            first = dict(metrics[0])
            if epoch_metric in first:
                self.last["epochs_done"] += 1
            self.last = {**self.last, **first}
            super().after_report(run_context, [dict(self.last), *metrics[1:]], checkpoint)

    return CarryForward()


def run_trial(
    params: dict[str, Any],
    *,
    component: str,
    fixed: dict[str, Any],
    data: Any,
    datasets: dict[str, Any],
    resources: dict[str, Any],
    use_gpu: bool,
    storage: str,
    run_name: str,
    groups: Any,
    seed: int,
) -> None:
    """The Tune trainable: fits one ``TorchTrainer`` with the sampled ``params``, or runs the
    family's own trial function.

    Raises:
        pydantic.ValidationError: the sampled config is not valid for the trainable.
        ray.train.TrainingFailedError: the training run failed (Tune records the error).
    """
    from ray import tune
    from ray.train import CheckpointConfig, DataConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from components.training import Loop, wait_for_resources

    trainable = registry.trainable(component)
    if trainable.trial is not None:
        trainable.trial(params, fixed=fixed, resources=resources, seed=seed)
        return
    config = registry.get(component).Config.model_validate({**fixed, **params})
    trial_id = tune.get_context().get_trial_id()
    per_worker = {"CPU": resources["cpus_per_worker"], **({"GPU": 1} if use_gpu else {})}
    loop = Loop(config=config.model_dump(mode="json"), data=data, trial=(trial_id, groups))
    wait_for_resources()  # a trial waits for the CPUs other trials and stages hold
    trainer = TorchTrainer(
        train_in_trial,
        train_loop_config={**loop.as_train_config(), "component": component},
        scaling_config=ScalingConfig(
            num_workers=resources["workers"], use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            # Unique per trial: Train resumes a run whose name and storage it finds again.
            name=f"{run_name}-{trial_id}",
            storage_path=storage,
            callbacks=[_report_callback(next(iter(trainable.epoch_metrics)))],
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=list(trainable.split)),
    )
    trainer.fit()


def train_in_trial(config: dict[str, Any]) -> None:
    """The family's own ``train_func``, after rank 0 has told the search which placement
    group holds this trial's workers (see :func:`_free_stopped_trials`)."""
    import ray

    from components import training

    trial_id, groups = training.loop_of(config).trial
    group = ray.util.get_current_placement_group()
    if training.world()[0] == 0 and group is not None:
        groups.put((trial_id, group.id.hex()))
    registry.trainable(config["component"]).train_func(config)


def _free_stopped_trials(groups: Any):
    """A Tune callback that removes the placement group of each trial that ended.

    When ASHA (or the time budget) stops a trial, Tune ends the trial's process, and with it
    Train's controller, which never gets to remove its workers' placement group. Train's
    detached cleaner would, but it finds the controller gone through the dashboard's state API,
    and the engine's Ray runs without a dashboard: the group would keep its CPUs reserved and
    later trials would wait forever.
    """
    from ray import tune

    class FreeStoppedTrials(tune.Callback):
        def __init__(self):
            self.by_trial: dict[str, str] = {}

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._free(trial.trial_id)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._free(trial.trial_id)

        def _free(self, trial_id: str) -> None:
            from ray._raylet import PlacementGroupID
            from ray.util.placement_group import PlacementGroup, remove_placement_group
            from ray.util.queue import Empty

            while True:
                try:
                    trial, group = groups.get_nowait()
                except Empty:
                    break
                self.by_trial[trial] = group
            group = self.by_trial.pop(trial_id, None)
            if group is not None:
                with contextlib.suppress(Exception):  # already removed by a clean shutdown
                    remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(group)))

    return FreeStoppedTrials()


# --- the stage ------------------------------------------------------------------------------


def concurrent_trials(
    resources, cluster: dict[str, float], use_gpu: bool, cpus_per_trial: float | None = None
) -> int:
    """How many trials fit on the cluster at once (at least 1).

    A Train trial holds ``workers * cpus_per_worker`` CPUs (and ``workers`` GPUs); the trial's
    own process and Train's controller hold none, so whole gangs never wait on each other.
    ``cpus_per_trial`` overrides the CPUs (an RL trial: its own process and its env runners).
    """
    cpus = cpus_per_trial or resources.workers * resources.cpus_per_worker
    fits = math.floor(cluster.get("CPU", 0) / cpus)
    if use_gpu:
        fits = min(fits, math.floor(cluster.get("GPU", 0) / resources.workers))
    return max(1, fits)


class TuneSearch(Component):
    """Searches the hyperparameters of a trainable component with Ray Tune."""

    version = "2"  # 2: the best trial exported as a model bundle
    Config = SearchConfig
    produces = "model"  # the trainable's model kind: see artifact_kind

    def artifact_kind(self, config: SearchConfig, ctx: StageContext) -> str:
        """The kind of the trainable's model: the search exports its best trial's model as
        the trainable would, for every consumer of that kind."""
        return registry.trainable(config.trainable).produces

    def run(self, ctx: StageContext, config: SearchConfig) -> dict[str, Any]:
        import ray
        from ray import tune
        from ray.util.queue import Queue

        trainable = registry.trainable(config.trainable)
        data = trainable.prepare(ctx)
        # Read once into the object store: every trial shares the blocks, and no trial waits
        # for a free CPU to re-read shards while the others' workers hold every CPU.
        datasets = {split: ds.materialize() for split, ds in data.datasets.items()}
        cluster = ray.cluster_resources()
        use_gpu = ctx.resources.use_gpu(cluster.get("GPU", 0))
        fixed = config.trainable_config()
        trial_cpus = trainable.trial_cpus(ctx.resources, fixed)
        # A Train trial only drives its TorchTrainer (whose controller holds no CPU either):
        # it asks for memory alone, so its CPUs are exactly its workers' CPUs. An RL trial
        # learns (and, without env runners, samples) in its own process, on the CPUs the
        # stage's own task would hold.
        own_cpus = (
            0 if trainable.trial is None else registry.get(config.trainable).task_cpus_for(fixed)
        )
        concurrent = config.max_concurrent_trials or concurrent_trials(
            ctx.resources, cluster, use_gpu, trial_cpus
        )
        groups = Queue(actor_options={"num_cpus": 0})  # trial id -> its workers' group
        run_name = f"search-{time.strftime('%Y%m%d-%H%M%S')}-{ctx.run_id[:8]}"
        scratch = str(ctx.scratch_dir).rstrip("/")
        trial_function = tune.with_resources(
            tune.with_parameters(
                run_trial,
                component=config.trainable,
                fixed=config.train,
                data=data.spec,
                datasets=datasets,
                resources=ctx.resources.model_dump(),
                use_gpu=use_gpu,
                storage=f"{scratch}/trials",
                run_name=run_name,
                groups=groups,
                seed=config.seed,
            ),
            {"CPU": own_cpus, "memory": TRIAL_DRIVER_MEMORY},
        )
        ctx.progress(note=f"{config.num_samples()} samples, {concurrent} trial(s) at once")
        tuner = tune.Tuner(
            trial_function,
            param_space={key: dim.to_tune() for key, dim in config.dimensions().items()},
            tune_config=tune.TuneConfig(
                metric=config.metric,
                mode=config.mode,
                num_samples=config.num_samples(),
                scheduler=_scheduler(config),
                search_alg=_searcher(config, concurrent),
                time_budget_s=config.time_budget_s,
            ),
            run_config=tune.RunConfig(
                name=run_name,
                storage_path=f"{scratch}/tune",
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),
                callbacks=[_free_stopped_trials(groups)],
            ),
        )
        started = time.time()
        try:
            grid = tuner.fit()
        finally:
            with contextlib.suppress(Exception):
                groups.shutdown()
        seconds = time.time() - started
        rows = [_trial_row(result, config) for result in grid]
        for i, row in enumerate(rows):
            ctx.report(step=i, **{k: v for k, v in row.items() if not k.startswith("config/")})
        _write_table(ctx.out_dir, rows)
        ok = [
            r for r in rows if r["status"] != "error" and r.get(f"best/{config.metric}") is not None
        ]
        if not ok:
            errors = "; ".join(f"{r['trial']}: {r['error'] or r['status']}" for r in rows)
            errors = errors or "no trial ran"
            raise RuntimeError(f"every trial of the search failed: {errors}")
        pick = max if config.mode == "max" else min
        best = pick(ok, key=lambda r: r[f"best/{config.metric}"])
        best_result = next(r for r in grid if _trial_name(r) == best["trial"])
        test = self._export_best(ctx, config, trainable, data, best, best_result)
        return {
            "trials": len(rows),
            "trials_failed": sum(r["status"] == "error" for r in rows),
            "trials_stopped_early": sum(r["status"] == "stopped" for r in rows),
            "epochs_run": sum(r["epochs_run"] for r in rows),
            "max_concurrent_trials": concurrent,
            "search_seconds": seconds,
            "best/trial": best["trial"],
            f"best/{config.metric}": best[f"best/{config.metric}"],
            "best/params": best_result.config,
            **test,
            "errors": {r["trial"]: r["error"] for r in rows if r["status"] == "error"},
        }

    def _export_best(self, ctx, config, trainable, data, best, result) -> dict[str, Any]:
        checkpoint = _checkpoint_of(result, trainable, config)
        shutil.copytree(checkpoint, ctx.out_dir / CHECKPOINT_DIR)
        trainable_config = config.trainable_config(result.config)
        test = trainable.export(ctx.out_dir, checkpoint, data, trainable_config)
        (ctx.out_dir / BEST_FILE).write_text(
            json.dumps(
                {
                    "trial": best["trial"],
                    "metric": config.metric,
                    "mode": config.mode,
                    "value": best[f"best/{config.metric}"],
                    "params": result.config,
                    "config": trainable_config.model_dump(mode="json"),
                    "trainable": config.trainable,
                },
                indent=1,
                sort_keys=True,
                default=str,
            )
        )
        return test


def _scheduler(config: SearchConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if config.scheduler == "fifo":
        return FIFOScheduler()
    # Time is counted in epochs; max_t is one past the last epoch so that ASHA never cuts a
    # finishing trial before its final (test) report and best-model checkpoint.
    return ASHAScheduler(
        time_attr="epochs_done",
        max_t=config.max_epochs() + 1,
        grace_period=config.grace_period,
        reduction_factor=config.reduction_factor,
    )


def _searcher(config: SearchConfig, concurrent: int):
    """The search algorithm, capped at ``concurrent`` trials at once.

    Tune applies ``TuneConfig.max_concurrent_trials`` to a ``Searcher`` (Optuna) but ignores it
    for the ``BasicVariantGenerator`` (random, grid), which takes its own ``max_concurrent``.
    """
    if config.search == "optuna":
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=config.seed))
        return ConcurrencyLimiter(searcher, max_concurrent=concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=config.seed, max_concurrent=concurrent)


def _checkpoint_of(result, trainable, config: SearchConfig) -> Path:
    """The checkpoint directory to export of a trial: the last one its Train run reported
    (it holds the best epoch where the trainable keeps it), or, for a trial reporting to Tune
    itself, its best (``keeps_best``) or last one."""
    path = result.metrics.get("checkpoint_path")
    if path is None and result.checkpoint is not None:
        checkpoint = result.checkpoint
        if trainable.keeps_best:
            checkpoint = result.get_best_checkpoint(config.metric, config.mode) or checkpoint
        path = checkpoint.path
    if not path:
        raise RuntimeError(f"the best trial {_trial_name(result)} left no checkpoint")
    return Path(path)


def _trial_name(result) -> str:
    return Path(result.path).name if result.path else str(result.metrics.get("trial_id"))


def _trial_row(result, config: SearchConfig) -> dict[str, Any]:
    """One row of the results table: the trial's config, final metrics, status and error."""
    from components.training import root_message

    metrics = result.metrics or {}
    params = result.config or {}
    epochs = int(metrics.get("epochs_done", 0))
    trainable = registry.trainable(config.trainable)
    if result.error is not None:
        status = "error"
    elif not metrics:
        status = "not started"  # the time budget ran out first
    elif (
        metrics.get("completed")  # a trial function that knows
        or any(name in metrics for name in trainable.test_metrics)  # the final test report
        or epochs >= trainable.budget(config.trainable_config(params))
    ):
        status = "completed"
    else:
        status = "stopped"  # by ASHA or the time budget
    row: dict[str, Any] = {"trial": _trial_name(result), "status": status, "epochs_run": epochs}
    for name in trainable.epoch_metrics:
        row[name] = _number(metrics.get(name))
    history = result.metrics_dataframe
    values = (
        history[config.metric].dropna() if history is not None and config.metric in history else []
    )
    # A trial is ranked by the value of the weights it exports: its best epoch's where the
    # trainable keeps them, otherwise its last.
    if not len(values):
        best, at = None, None
    else:
        at = values.index[-1]
        if trainable.keeps_best:
            at = values.idxmax() if config.mode == "max" else values.idxmin()
        best = values[at]
        at = history["epochs_done"][at] if "epochs_done" in history else None
    row[f"best/{config.metric}"] = _number(best)
    row["best/epoch"] = _number(at)  # the epoch (evaluation) whose weights it exports
    row["trial_seconds"] = _number(metrics.get("time_total_s"))
    for key, value in params.items():
        scalar = value is None or isinstance(value, int | float | str | bool)
        row[f"config/{key}"] = value if scalar else json.dumps(value, sort_keys=True)
    row["error"] = root_message(result.error) if result.error is not None else None
    return row


def _number(value: Any) -> float | None:
    import numbers

    return float(value) if isinstance(value, numbers.Real) else None


def _write_table(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    table = pd.DataFrame(rows)
    table.to_parquet(out_dir / RESULTS_FILE, index=False)
    table.to_csv(out_dir / "results.csv", index=False)
