import random

import pytest

from rayflow.errors import InvalidInputError
from rayflow.jobs.synthetic_tasks import trajectory
from rayflow.wire.hub_records import trajectory_from_wire, trajectory_to_wire


def test_trajectory_round_trips_through_the_wire_form():
    original = trajectory(random.Random(5), task_id="t-1", success=False)
    assert trajectory_from_wire(trajectory_to_wire(original)) == original


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {"query": "q"},
        {"task_id": 1, "query": "q"},
        {"task_id": "t", "query": "q", "steps": [["only-action"]]},
        {"task_id": "t", "query": "q", "steps": [[1, 2]]},
        {"task_id": "t", "query": "q", "exit_code": True},
        {"task_id": "t", "query": "q", "reward": "high"},
        {"task_id": "t", "query": "q", "used_item_ids": [1]},
        {"task_id": "t", "query": "q", "surprise": 1},
        {"task_id": "t", "query": "q", "steps": [["a", "b"]] * 501},
    ],
)
def test_malformed_trajectories_are_refused_with_a_typed_error(bad):
    with pytest.raises(InvalidInputError):
        trajectory_from_wire(bad)
