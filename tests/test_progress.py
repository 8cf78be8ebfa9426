"""The quiet console: the driver-side progress line that follows rank 0's JSONL log, and the run dir's
link to the Ray workers' logs (plain files, no Ray started)."""

from __future__ import annotations

import json
import time

from draftalign.progress import JsonlTail, follow_log
from draftalign.runtime import link_ray_logs


def _append(path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def _wait_for(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "the follower did not catch up"
        time.sleep(0.01)


def test_tail_reads_only_complete_new_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    tail = JsonlTail(path)
    assert tail.read() == []  # not written yet
    _append(path, '{"step": 1}\n{"step": 2, "lo')
    assert tail.read() == [{"step": 1}]
    assert tail.read() == []  # the half-written line waits
    _append(path, 'ss": 0.5}\nnot json\n{"step": 3}\n')
    assert tail.read() == [{"step": 2, "loss": 0.5}, {"step": 3}]  # the torn/garbled line is skipped


def test_follow_log_moves_the_bar_to_the_latest_step(tmp_path):
    path = tmp_path / "distill_log.jsonl"
    _append(path, json.dumps({"step": 9, "loss": 9.0}) + "\n")  # the earlier run's lines: not shown
    fields = {"loss": "loss", "heldout_acceptance": "heldout"}
    with follow_log(path, total=20, desc="distill", fields=fields, initial=5, every=0.01) as bar:
        assert bar.n == 5 and bar.total == 20  # a resumed run starts at its checkpoint's step
        time.sleep(0.05)
        assert bar.n == 5
        _append(path, json.dumps({"step": 6, "loss": 1.25}) + "\n" + '{"step": 7, "loss": 1.')
        _wait_for(lambda: bar.n == 6)
        assert bar.postfix == "loss=1.25"
        _append(path, '0}\n' + json.dumps({"step": 8, "loss": 0.75, "heldout_acceptance": 0.5}) + "\n")
        _wait_for(lambda: bar.n == 8)
        assert bar.postfix == "loss=0.75, heldout=0.5"
        # a restarted learner repeats steps since its checkpoint: the bar follows it back
        _append(path, json.dumps({"step": 7, "loss": 0.9, "learner_attempt": 1}) + "\n")
        _wait_for(lambda: bar.n == 7)
        assert bar.postfix == "loss=0.9, heldout=0.5"  # held-out keeps its latest value
        _append(path, json.dumps({"step": 10, "loss": 0.5}) + "\n")  # written just before fit() returns
    assert bar.n == 10 and bar.disable  # read on exit, then closed


def test_ray_session_logs_are_linked_from_the_run_dir(tmp_path, monkeypatch):
    from ray._private import worker

    class Node:  # the driver's view of the local Ray node
        def __init__(self, logs):
            self.logs = logs

        def get_logs_dir_path(self):
            return str(self.logs)

    logs = tmp_path / "run" / "logs"
    sessions = [tmp_path / "ray" / f"session_{i}" / "logs" for i in (1, 2)]
    for session in sessions:  # e.g. generate's Ray session, then pretrain's
        session.mkdir(parents=True)
        monkeypatch.setattr(worker, "_global_node", Node(session))
        assert link_ray_logs(logs) == logs / "ray"
        assert (logs / "ray").resolve() == session
    assert (logs / "session_1").resolve() == sessions[0]  # the earlier session stays reachable
    monkeypatch.setattr(worker, "_global_node", None)  # e.g. a ray:// client: no local session dir
    assert link_ray_logs(logs) is None and (logs / "ray").resolve() == sessions[1]
