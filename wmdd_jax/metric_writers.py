"""Metric curves for TensorBoard: event files written without TensorFlow.

Every training run (teacher, students) and the recover stage write their logged scalars twice: as
JSON lines (``metrics.jsonl``, read by the code and the tests) and as TensorBoard event files in
the same folder (``tensorboard --logdir WORKDIR`` shows every run of a work directory).

`EventFileWriter` has the methods of ``clu.metric_writers.MetricWriter`` that we use
(``write_scalars``, ``flush``, ``close``), so a clu writer can stand in for it.
It is not a clu class: ``clu.metric_writers`` (0.0.12, the latest) imports TensorFlow when the
package loads, and TensorFlow stays optional here; the ``tensorboard`` package alone writes the
event protocol. Only process 0 writes.
"""

from __future__ import annotations

import time
from typing import Mapping

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter as _Events

from wmdd_jax.sharding import process_index


class EventFileWriter:
    """Scalars into one event file."""

    def __init__(self, logdir: str):
        self._events = _Events(logdir) if process_index() == 0 else None

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._events is not None:
            values = [Summary.Value(tag=key, simple_value=float(value)) for key, value in scalars.items()]
            self._events.add_event(Event(step=int(step), wall_time=time.time(), summary=Summary(value=values)))

    def flush(self) -> None:
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve of the event files in ``logdir``: tag -> [(step, value), ...]."""
    # Imported here: the reader adds 0.7 s to every process's start, and only readers need it.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logdir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
