"""parallel/distributed.py: the launcher's environment round-trips; one process stays alone."""

import pytest

from podtrain.parallel import distributed


def test_job_round_trips_through_the_environment():
    job = distributed.Job("127.0.0.1:1234", num_processes=4, process_id=2, cpu_devices=2, heartbeat_s=15)
    assert distributed.job_from_env(job.env()) == job


def test_no_launcher_means_no_job():
    assert distributed.job_from_env({}) is None
    assert distributed.initialize({}) is False


def test_a_half_set_environment_is_an_error():
    with pytest.raises(RuntimeError, match="PODTRAIN_COORDINATOR is set"):
        distributed.job_from_env({distributed.ENV_COORDINATOR: "127.0.0.1:1"})
