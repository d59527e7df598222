"""Stepping, on the engine's worker thread: one scheduler pass advances every running request by a token.

A request of a model that cannot batch takes one token from its own stream (fair round-robin). A batch row
prefills one chunk per pass until its prompt is in, then joins its model's DecodeBatch; every pass then runs
ONE forward for all joined rows of a model and hands each row its token. Cancellation is checked before
every token; a failed batched forward fails every row of its batch. Decode forwards are counted per model
and mode (batched or round_robin) for /metrics.

`Stepping` is one part of `Engine` (engine.py holds the state it works on).
"""

from __future__ import annotations

from .request import Event
from .running import Running


class Stepping:
    """The Engine's decode steps: `_step` runs once per scheduler pass on the worker thread."""

    def _step(self) -> None:
        for state in list(self._running):
            if state.batch is not None:
                self._advance_row(state)
                continue
            handle = state.handle
            if handle.cancelled:
                state.run.events.close()
                self._finish(state, "cancelled", None)
                continue
            try:
                event = next(state.run.events)
            except Exception as exc:
                self._retire(state)
                self._fail(handle, exc)
                continue
            if event.finish_reason is None:   # a token: one forward of one request
                self._count_forwards(state.resident.name, "round_robin", 1)
            self._handle_event(state, event)
        stepping = {}
        for state in self._running:
            if state.batch is not None and len(state.batch):
                stepping[id(state.batch)] = (state.resident.name, state.batch)
        for name, batch in stepping.values():
            self._step_batch(name, batch)
        for name, (resident, batch) in list(self._batches.items()):
            if self.registry.resident.get(name) is not resident:
                del self._batches[name]  # the model was unloaded: its batch goes with it (rows keep theirs)
        for name, (resident, _) in list(self._unbatched.items()):
            if self.registry.resident.get(name) is not resident:
                del self._unbatched[name]  # ... and so does what kept an unloaded model referenced

    def _advance_row(self, state: Running) -> None:
        """A batch row between steps: leave when cancelled, else prefill a chunk or join the batch."""
        row, handle = state.run.row, state.handle
        if handle.cancelled:
            state.batch.remove(row)
            self._finish(state, "cancelled", row.stats())
            return
        if state.joined:
            return
        try:
            if not row.ready:
                row.prefill_step()
                if row.prefilled < len(row.prompt_ids):
                    handle.push(Event("progress", processed=row.prefilled, total=len(row.prompt_ids)))
            if row.ready:
                state.batch.add(row)
                state.joined = True
        except Exception as exc:
            self._retire(state)
            self._fail(handle, exc)

    def _step_batch(self, name: str, batch) -> None:
        """One batched forward for every joined row of a model; hand each row its token."""
        before = batch.row_steps
        try:
            results = batch.step()
        except Exception as exc:  # the batch's caches are in an unknown state: every row of it fails
            rows = list(batch.rows)
            batch.clear()
            for row in rows:
                state = self._owners.get(id(row))
                if state is not None:
                    self._retire(state)
                    self._fail(state.handle, exc)
            return
        self._count_forwards(name, "batched", batch.row_steps - before, batch=batch)
        for row, events in results:
            state = self._owners.get(id(row))
            for event in events:
                self._handle_event(state, event)

    def _count_forwards(self, model: str, mode: str, rows: int, batch=None) -> None:
        self.metrics.inc("mlxedge_decode_forwards_total", model=model, mode=mode)
        self.metrics.inc("mlxedge_decode_rows_total", rows, model=model, mode=mode)
        if batch is not None:
            entry = self.batching.get(model)
            if entry is not None:
                entry.update(forwards=batch.forwards, row_steps=batch.row_steps, max_rows=batch.max_rows)
