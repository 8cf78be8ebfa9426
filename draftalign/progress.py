"""A driver-side progress line for a Ray Train stage, fed by the JSONL log rank 0 already writes.

In quiet mode (`draftalign.runtime.quiet`) the workers' output stays in Ray's log files, so the driver
draws the stage's one live line itself: a daemon thread polls the log for complete new lines and sets a
`tqdm` bar to the latest record's "step", with a few of its fields as the postfix.
"""

from __future__ import annotations

import json
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm


class JsonlTail:
    """The complete lines appended to a JSONL file since the previous `read()`, parsed. A half-written
    last line waits for its newline; a missing file reads as empty; unparsable lines are skipped."""

    def __init__(self, path: str | Path, offset: int = 0):
        self.path, self.offset = Path(path), offset

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                if f.seek(0, 2) < self.offset:  # truncated or replaced: start over
                    self.offset = 0
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        records = []
        for line in complete.splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # e.g. a killed worker's torn line with the next run's appended to it
                continue
        return records


@contextmanager
def follow_log(path: str | Path, total: int, desc: str, fields: dict[str, str] | None = None, *,
               initial: int = 0, every: float = 1.0):
    """Show a bar at `initial`/`total` steps while the body runs, moved to the "step" of the newest
    record appended to `path` (a restarted learner repeats steps: the bar goes back with it), with
    postfix `label=value` for each `fields` {log key: label}, the latest value seen of each. Only lines
    appended after entry count (a resumed run's log holds the earlier run's). Yields the bar."""
    fields = fields or {}
    tail = JsonlTail(path, Path(path).stat().st_size if Path(path).exists() else 0)
    # smoothing=0: n is set, not incremented, so the rate is the average since the start
    bar = tqdm(total=total, initial=initial, desc=desc, unit="step", smoothing=0, file=sys.stderr,
               dynamic_ncols=True)
    shown: dict[str, float] = {}

    def poll() -> None:
        try:
            records = [r for r in tail.read() if isinstance(r, dict) and isinstance(r.get("step"), int)]
            if not records:
                return
            for r in records:
                shown.update({label: r[key] for key, label in fields.items() if r.get(key) is not None})
            bar.set_postfix(shown, refresh=False)
            bar.n = records[-1]["step"]
            bar.refresh()
        except Exception:  # noqa: BLE001 - a progress line must never fail (or mask the error of) a run
            pass

    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            poll()

    thread = threading.Thread(target=loop, name=f"follow_log-{desc}", daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        stop.set()
        thread.join()
        poll()  # the last records, written just before the body returned
        bar.close()
