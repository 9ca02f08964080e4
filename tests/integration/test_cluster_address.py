"""A local run starts, and its Ray processes talk to, its own cluster when another Ray instance
runs on the same machine (a second run, a notebook, `ray start --head`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

# A worker of a cluster started by `init_ray` (the pipelines' own start-up, its runtime env and
# set-up hook included) asks which cluster Ray's State API would query while a second GCS runs
# on the machine. Ray Train's placement-group cleaner makes this query in every fit; before the
# hook pinned $RAY_ADDRESS it raised "Found multiple active Ray instances" and the cleaner's
# traceback reached the console (seen in the demo run beside the test session's cluster).
SCRIPT = """
import json, ray
from ray._private import services
from rfsr_ray.cli import init_ray

# As if `ray start --head` had recorded its cluster in /tmp/ray: a local run starts its own
# cluster anyway (ray.init's default would join that one, then refuse num_cpus).
services.find_bootstrap_address = lambda temp_dir=None: "192.0.2.8:6379"
init_ray(num_cpus=1)

@ray.remote(num_cpus=0)
def query():
    from ray._private import services
    own = ray.get_runtime_context().gcs_address
    services.find_gcs_addresses = lambda: ["192.0.2.9:6379", own]  # another Ray instance
    return services.canonicalize_bootstrap_address_or_die(None), own

print(json.dumps(ray.get(query.remote(), timeout=120)))
"""


def test_workers_query_their_own_cluster_when_another_ray_runs_on_the_machine(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    queried, own = json.loads(result.stdout.strip().splitlines()[-1])
    assert queried == own
