"""Executors: run an engine stage's missing shards, here or on a Ray cluster.

Both backends run the same ``worker.ShardWorker`` code on the same shard indices and
write the same part files, so a run gives the same bytes on either, and a run begun
on one can be resumed on the other. ``run`` yields each shard as it finishes, so the
driver's progress and manifest advance live.

* ``local``: one worker (one engine) in this process, shards one after another; an
  engine stays loaded while consecutive stages need the same one.
* ``ray``: per stage, a Ray Data pipeline whose rows are shard indices, mapped by a
  pool of up to ``execution.replicas`` actors, each holding one engine
  (``map_batches`` with ``batch_size=1`` and an ``ActorPoolStrategy``). Ray restarts
  a dead actor and retries its shard; the atomic writes make a retried shard
  indistinguishable from a first try. Pools run one stage after another, so a GPU
  holds one engine at a time.

Ray notes (docs/design.md §5): the local instance this module starts gets two spare
logical CPUs, because a pipeline whose engine actors hold every logical CPU hangs
(Ray Data's own tasks cannot start); the actor's constructor argument is the small
``StageTask``, never data; ``ray stop`` is never called (it kills every Ray process
on the machine).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np

from pipeline.config import ExecutionConfig
from pipeline.errors import PipelineError
from pipeline.terminal import LOGGER
from pipeline.worker import ShardDone, ShardWorker, StageTask

# Logical CPUs left free beside the engine actors on a Ray instance started here.
_SPARE_CPUS = 2
# How long a finished stage's actors may take to give their resources back.
_RELEASE_TIMEOUT_S = 120.0


class Executor(Protocol):
    """Runs shards of a stage and yields each as it is written."""

    def run(self, task: StageTask, shards: Sequence[int]) -> Iterator[ShardDone]:
        """Make ``shards`` of ``task``'s stage; yield each when its part is written."""
        ...

    def description(self) -> dict[str, Any]:
        """The backend and its settings, for the manifest."""
        ...


class LocalExecutor:
    """Engines in this process, one at a time; shards one after another.

    A stage that needs the engine the previous stage used (sampling with p0, then
    scoring under p0) keeps it instead of loading the model again; ``close`` shuts the
    last one down.
    """

    def __init__(self) -> None:
        self._worker: ShardWorker | None = None

    def run(self, task: StageTask, shards: Sequence[int]) -> Iterator[ShardDone]:
        """Make each shard with an engine for the task's model, loaded if need be."""
        if self._worker is not None and self._worker.task.engine_inputs() == task.engine_inputs():
            self._worker.task = task
        else:
            self.close()
            self._worker = ShardWorker(task)
        for index in shards:
            yield self._worker.make(index)

    def close(self) -> None:
        """Shut the engine down, if one is loaded."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.close()

    def description(self) -> dict[str, Any]:
        """``{"backend": "local"}``."""
        return {"backend": "local"}


class _RayShardMapper:
    """Ray Data callable class: one engine per actor, one shard per batch."""

    def __init__(self, task: StageTask) -> None:
        self.worker = ShardWorker(task)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = [self.worker.make(int(index)) for index in batch["shard"]]
        return {
            "shard": np.array([d.index for d in done], dtype=np.int64),
            "rows": np.array([d.rows for d in done], dtype=np.int64),
            "seconds": np.array([d.seconds for d in done], dtype=np.float64),
        }


class RayExecutor:
    """Per stage, a Ray Data pipeline over shard indices with a pool of engine actors."""

    def __init__(self, execution: ExecutionConfig) -> None:
        self.execution = execution

    def run(self, task: StageTask, shards: Sequence[int]) -> Iterator[ShardDone]:
        """Map the shard indices through the actor pool; yield shards as they finish."""
        import ray

        from pipeline.terminal import verbose

        # The driver draws its own progress per shard; Ray Data's bars only with --verbose.
        ray.data.DataContext.get_current().enable_progress_bars = verbose()
        execution = self.execution
        gpus = execution.num_gpus
        if task.engine.tensor_parallel_size > 1 and gpus < task.engine.tensor_parallel_size:
            raise PipelineError(
                f"execution.num_gpus={gpus} is less than engine.tensor_parallel_size="
                f"{task.engine.tensor_parallel_size}: a replica must hold all the GPUs of "
                "its engine."
            )
        free_before = _free_engine_resources()
        dataset = ray.data.from_items([{"shard": index} for index in shards]).map_batches(
            _RayShardMapper,
            fn_constructor_args=(task,),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(
                min_size=1,
                max_size=min(execution.replicas, len(shards)),
                max_tasks_in_flight_per_actor=1,
            ),
            num_cpus=execution.num_cpus,
            num_gpus=gpus,
        )
        for row in dataset.iter_rows():
            yield ShardDone(int(row["shard"]), int(row["rows"]), float(row["seconds"]))
        _wait_for_release(free_before, task.stage)

    def description(self) -> dict[str, Any]:
        """Backend, Ray version, cluster size and the pool settings."""
        import ray

        return {
            "backend": "ray",
            "ray": ray.__version__,
            "nodes": len([node for node in ray.nodes() if node.get("Alive")]),
            **self.execution.model_dump(mode="json", exclude={"backend"}),
        }


def _free_engine_resources() -> dict[str, float]:
    import ray

    free = ray.available_resources()
    return {key: free.get(key, 0.0) for key in ("CPU", "GPU")}


def _wait_for_release(free_before: dict[str, float], stage: str) -> None:
    """Wait until the stage's actors have given their CPUs and GPUs back.

    Ray tears a finished pool's actors down asynchronously: without this wait the
    next stage's engine loaded while the last one (about 0.9 GiB on CPU; a whole GPU's
    memory on CUDA) was still alive.
    """
    deadline = time.monotonic() + _RELEASE_TIMEOUT_S
    while time.monotonic() < deadline:
        free = _free_engine_resources()
        if all(free[key] >= value for key, value in free_before.items()):
            return
        time.sleep(0.5)
    LOGGER.warning(
        f"{stage}: Ray has not released the stage's engine actors after "
        f"{_RELEASE_TIMEOUT_S:.0f} s; the next stage starts beside them."
    )


@contextmanager
def open_executor(execution: ExecutionConfig) -> Iterator[Executor]:
    """The configured executor; for Ray, joins (or starts, then stops) a Ray instance.

    A Ray instance already initialised in this process (by a test, or a notebook) is
    used as it is and left running.
    """
    if execution.backend == "local":
        local = LocalExecutor()
        try:
            yield local
        finally:
            local.close()
        return
    try:
        import ray
    except ImportError:
        raise PipelineError(
            "execution.backend=ray needs Ray: pip install 'entropy-pipeline[ray]'."
        ) from None
    started_here = not ray.is_initialized()
    if started_here:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if execution.address is None:
            options.update(
                address="local",
                num_cpus=int(execution.replicas * execution.num_cpus) + _SPARE_CPUS,
            )
        else:
            options["address"] = execution.address
        try:
            ray.init(**options)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise PipelineError(
                f"cannot start or join Ray (execution.address={execution.address!r}): {err}"
            ) from None
    try:
        yield RayExecutor(execution)
    finally:
        if started_here:
            ray.shutdown()
