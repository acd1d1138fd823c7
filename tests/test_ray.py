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
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from pipeline.worker import KILL_ONCE_ENV
from tests.conftest import DEFAULT_CONFIG, ROOT, run_cli
from tests.test_resume import assert_same_run

pytestmark = pytest.mark.engine

# 12 prompts in 6 shards of 2, 4 samples each: enough shards for two replicas to share,
# and for a driver killed after its first shard to leave most of them.
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


def _kill_driver_after_its_first_shard(run_dir: Path) -> None:
    """Start a local run of SMALL in its own process and SIGKILL it once a sample part exists."""
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "run",
        "--config",
        str(DEFAULT_CONFIG),
        "--out",
        str(run_dir),
        *SMALL,
    ]
    driver = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while not list((run_dir / "samples").glob("part-*.parquet")):
            assert driver.poll() is None, "the driver ended before its first shard"
            assert time.monotonic() < deadline, "no sample shard after 300 s"
            time.sleep(0.02)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()


def test_killed_driver_resumed_on_ray_gives_the_local_bytes_when_a_worker_dies(
    ray_instance: ModuleType, local_run: Path, tmp_path: Path
) -> None:
    """A run begun locally and killed is finished by Ray actors, one of which dies."""
    run_dir = tmp_path / "ray"
    _kill_driver_after_its_first_shard(run_dir)
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "running"
    made_locally = len(list((run_dir / "samples").glob("part-*.parquet")))
    assert made_locally < SHARDS, "the kill must land in the middle of sampling"
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
    # The shard fingerprints do not depend on the backend: same inputs on both.
    local = json.loads((local_run / "manifest.json").read_text())
    assert manifest["inputs"] == local["inputs"]
