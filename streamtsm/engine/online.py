"""The online runner: one batched step for the next frame of every ready stream, each with its own state.

A state is the engine's mapping name -> array (see :class:`~streamtsm.engine.base.OnlineEngine`); the runner never
looks inside it, it only hands states to the engine to zero, stack, step and split.

Streams join and leave at any time. A stream's state is kept between steps as a single-stream state (batch 1) and
stacked with the others' for the batched call. When the set of streams in a step is the same as in the previous
step, the batched state is reused as it is, so the steady state costs no stacking or splitting.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import OnlineEngine, State


class StepError(RuntimeError):
    """The engine raised during a step; the states of ``stream_ids`` were reset."""

    def __init__(self, stream_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"model step failed for {', '.join(stream_ids)}: {type(cause).__name__}: {cause}")
        self.stream_ids = stream_ids


class OnlineRunner:
    """Keeps per-stream state for an :class:`OnlineEngine` and steps batches of streams.

    A stream's state restarts from zeros when it is first seen, when its ``generation`` changes (its source
    reconnected or restarted), after :meth:`reset`, and after a failed step.
    """

    kind = "online"  # the model kind it runs, as in ModelConfig.kind and the stats' "models"

    def __init__(self, engine: OnlineEngine) -> None:
        self.engine = engine
        self._generation: dict[str, int] = {}
        self._single: dict[str, State] = {}  # streams whose state is held on its own (batch 1)
        self._batch_ids: tuple[str, ...] = ()  # streams whose state lives in _batch_state, row i = stream i
        self._batch_state: State | None = None

    @property
    def streams(self) -> list[str]:
        return list(self._generation)

    def state_of(self, stream_id: str) -> State | None:
        """The stream's current state (batch 1, keyed as the engine's ``state_spec``), None when it has none yet.

        Reading it leaves the runner as it was: the steady batch is not split.
        """
        if stream_id in self._batch_ids:
            row = self._batch_ids.index(stream_id)
            return self.engine.split(self._batch_state, len(self._batch_ids))[row]
        return self._single.get(stream_id)

    def reset(self, stream_id: str) -> None:
        """Forget a stream's state (it starts from zeros at its next step)."""
        self._unbatch()
        self._single.pop(stream_id, None)

    def remove(self, stream_id: str) -> None:
        """Forget a stream entirely (it left)."""
        self.reset(stream_id)
        self._generation.pop(stream_id, None)

    def step(self, stream_ids: Sequence[str], generations: Sequence[int], frames: np.ndarray) -> np.ndarray:
        """Run one frame of each stream.

        Args:
            stream_ids: ids of the B streams, unique.
            generations: each stream's source generation; a change resets that stream's state.
            frames: float32 ``[B, 3, S, S]``, row b for stream b.

        Returns:
            float32 logits ``[B, K]``.

        Raises:
            StepError: the engine failed; the states of these streams were reset, the others are untouched.
        """
        ids = tuple(stream_ids)
        for sid, gen in zip(ids, generations):
            if self._generation.get(sid) != gen:
                self._generation[sid] = gen
                self.reset(sid)
        if ids == self._batch_ids and self._batch_state is not None:
            state = self._batch_state
        else:
            self._unbatch()
            missing = [sid for sid in ids if sid not in self._single]
            if missing:
                zeros = self.engine.split(self.engine.zero_state(len(missing)), len(missing))
                self._single.update(zip(missing, zeros))
            state = self.engine.stack([self._single.pop(sid) for sid in ids])
        try:
            logits, new_state = self.engine.step(frames, state)
        except Exception as e:
            # The batched state may be half-written; drop it for these streams so they restart cleanly.
            self._batch_ids, self._batch_state = (), None
            for sid in ids:
                self._single.pop(sid, None)
            raise StepError(list(ids), e) from e
        self._batch_ids, self._batch_state = ids, new_state
        return logits

    def process(self, stream_ids: Sequence[str], generations: Sequence[int],
                frames: np.ndarray) -> list[np.ndarray]:
        """The runner interface the pipeline uses (shared with :class:`~streamtsm.engine.clip.ClipRunner`):
        logits ``[K]`` for every stream, since an online model predicts at every frame."""
        return list(self.step(stream_ids, generations, frames))

    def _unbatch(self) -> None:
        if self._batch_state is not None:
            parts = self.engine.split(self._batch_state, len(self._batch_ids))
            self._single.update(zip(self._batch_ids, parts))
        self._batch_ids, self._batch_state = (), None
