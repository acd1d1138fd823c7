"""The Ray backend on a local Ray instance that these tests start on 127.0.0.1.

The module starts its own Ray instance in this process (``ray.init(address="local")``
on 127.0.0.1, with usage stats, authentication tokens and the dashboard off, in a
private temporary folder) and shuts it down; no test joins or stops a Ray instance it
did not start. Every Ray run must give
the bytes of the local run of the same config: every Parquet table with its
metadata, and summary.json (apart from the start time and the config hash, which
covers the executor settings).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from pipeline.worker import KILL_ONCE_ENV
from tests.conftest import DEFAULT_CONFIG, run_cli
from tests.test_resume import assert_same_run

pytestmark = pytest.mark.engine

# 12 prompts in 6 shards of 2, 4 samples each: enough shards for two replicas to share.
SHARDS = 6
SMALL = [
    "prompts.limit=12",
    "shards.prompts_per_shard=2",
    "sampling.num_samples=4",
    "sampling.max_tokens=24",
]
RAY = ["execution.backend=ray", "execution.replicas=2"]


def _run(run_dir: Path, *extra: str) -> int:
    return run_cli("run", "--config", DEFAULT_CONFIG, "--out", run_dir, *SMALL, *extra)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("ray") / "local"
    assert _run(run_dir) == 0
    return run_dir


# Armed by creating it: the next worker to reach the middle of a shard kills itself.
KILL_MARKER = Path(tempfile.gettempdir()) / f"entropy-pipeline-test-kill-{os.getpid()}"


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[ModuleType]:
    """A private local Ray instance for this module's tests; yields the ``ray`` module."""
    # Imported here, not at collection: the fast lane collects this module too.
    import ray

    # Short folder: Ray's socket paths must fit 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # No usage report, and no token written to the home folder: this instance
    # listens on 127.0.0.1 only and lives for these tests.
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=temp_dir,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {KILL_ONCE_ENV: str(KILL_MARKER)}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def test_a_local_run_finished_on_ray_gives_the_local_bytes_when_a_worker_dies(
    ray_instance: ModuleType, local_run: Path, tmp_path: Path
) -> None:
    """A run begun on the local backend is finished by Ray actors, one of which dies.

    The local run's samples of shards 2 to 5 are removed (as a killed driver leaves them
    missing; test_resume.py kills real drivers): Ray makes those samples and both
    models' scores of them, two actors per stage.
    """
    run_dir = tmp_path / "ray"
    shutil.copytree(local_run, run_dir)
    for index in range(2, SHARDS):
        (run_dir / "samples" / f"part-{index:05d}.parquet").unlink()
    KILL_MARKER.touch()
    try:
        assert _run(run_dir, *RAY) == 0
        # The hook fired: one actor removed the marker and SIGKILLed itself mid-shard;
        # Ray restarted it and the shard was made again.
        assert not KILL_MARKER.exists()
    finally:
        KILL_MARKER.unlink(missing_ok=True)
    assert_same_run(run_dir, local_run, same_config=False)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["executor"]["backend"] == "ray"
    assert manifest["executor"]["ray"] == ray_instance.__version__
    assert manifest["executor"]["replicas"] == 2
    # Made again on Ray: the removed shards' samples and every model's scores of them.
    assert manifest["stages"]["sample"]["shards_made"] == SHARDS - 2
    assert manifest["stages"]["score/p1"]["shards_made"] == SHARDS - 2
    # The shard fingerprints do not depend on the backend: same inputs on both.
    local = json.loads((local_run / "manifest.json").read_text())
    assert manifest["inputs"] == local["inputs"]
