"""The online runner batches streams that join and leave, each with its own state."""

import numpy as np
import pytest
import torch

from streamtsm.engine.base import StateSpec
from streamtsm.engine.online import OnlineRunner, StepError
from streamtsm.engine.torch_engine import TorchOnlineEngine
from streamtsm.models import create

from .conftest import randomize_, scaled_diff

SIZE = 32


@pytest.fixture(scope="module")
def engine():
    model = create("tsm_mobilenetv2_online", num_classes=4, width_mult=0.25, input_size=SIZE, resize_size=SIZE)
    return TorchOnlineEngine(randomize_(model, seed=2))


def _frames(seed, n):
    return np.random.default_rng(seed).standard_normal((n, 1, 3, SIZE, SIZE)).astype(np.float32)


def _alone(engine, frames):
    """Logits of one stream stepped on its own from zeros: frames [T, 1, 3, S, S] -> [T, K]."""
    state, out = engine.zero_state(1), []
    for f in frames:
        logits, state = engine.step(f, state)
        out.append(logits[0])
    return np.stack(out)


def test_batched_streams_that_join_and_leave_equal_each_stream_alone(engine):
    a, b, c = _frames(0, 6), _frames(1, 6), _frames(2, 6)
    runner = OnlineRunner(engine)
    got = {"a": [], "b": [], "c": []}
    # a runs throughout; b joins at step 2; c runs steps 0-2, leaves, and is never seen again.
    plan = [("a", "c"), ("a", "c"), ("a", "b", "c"), ("b", "a"), ("a", "b"), ("a", "b")]
    step_of = {"a": 0, "b": 0, "c": 0}
    data = {"a": a, "b": b, "c": c}
    for ids in plan:
        frames = np.concatenate([data[i][step_of[i]] for i in ids])
        logits = runner.step(ids, [0] * len(ids), frames)
        for i, row in zip(ids, logits):
            got[i].append(row)
            step_of[i] += 1
        if ids == ("a", "b", "c"):
            runner.remove("c")
    assert scaled_diff(np.stack(got["a"]), _alone(engine, a)) <= 1e-4
    assert scaled_diff(np.stack(got["b"]), _alone(engine, b[:4])) <= 1e-4
    assert scaled_diff(np.stack(got["c"]), _alone(engine, c[:3])) <= 1e-4


def test_new_generation_restarts_the_stream_from_zeros(engine):
    x = _frames(3, 5)
    runner = OnlineRunner(engine)
    for t in range(3):
        runner.step(["s"], [0], x[t])
    after_reconnect = [runner.step(["s"], [1], x[t])[0] for t in (3, 4)]
    assert scaled_diff(np.stack(after_reconnect), _alone(engine, x[3:5])) <= 1e-4


def test_failed_step_resets_only_the_streams_in_it(engine):
    class Flaky:
        def __init__(self, inner):
            self.inner, self.fail = inner, False

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def step(self, frames, state):
            if self.fail:
                raise RuntimeError("boom")
            return self.inner.step(frames, state)

    flaky = Flaky(engine)
    runner = OnlineRunner(flaky)
    x, y = _frames(4, 4), _frames(5, 4)
    runner.step(["x", "y"], [0, 0], np.concatenate([x[0], y[0]]))
    runner.step(["y"], [0], y[1])
    flaky.fail = True
    with pytest.raises(StepError, match="x") as err:
        runner.step(["x"], [0], x[1])
    assert err.value.stream_ids == ["x"]
    flaky.fail = False
    got_x = runner.step(["x"], [0], x[2])[0]
    got_y = runner.step(["y"], [0], y[2])[0]
    assert scaled_diff(got_x, _alone(engine, x[2:3])[0]) <= 1e-4  # x restarted
    assert scaled_diff(got_y, _alone(engine, y[:3])[-1]) <= 1e-4  # y kept its history


def test_torch_engine_stack_and_split_are_inverse(engine):
    states = [engine.zero_state(1) for _ in range(3)]
    for i, s in enumerate(states):
        for t in s.values():
            t.fill_(i + 1)
    parts = engine.split(engine.stack(states), 3)
    for got, want in zip(parts, states):
        assert list(got) == list(want) == list(engine.state_names)
        assert all(torch.equal(got[name], want[name]) for name in engine.state_names)


def test_torch_engine_state_spec_names_every_state_tensor_as_the_onnx_graph_does(engine):
    s = SIZE
    shapes = engine.model.state_shapes(s, s)
    assert engine.state_spec == tuple(StateSpec(f"state_{i}", tuple(shape)) for i, shape in enumerate(shapes))
    state = engine.zero_state(2)
    assert list(state) == [spec.name for spec in engine.state_spec]
    assert all(tuple(v.shape) == (2, *spec.shape) for v, spec in zip(state.values(), engine.state_spec))
    _, new_state = engine.step(_frames(0, 2)[:, 0], state)
    assert list(new_state) == list(state)


def test_torch_engine_step_rejects_a_state_with_other_names_or_shapes(engine):
    x = _frames(0, 1)[0]
    state = engine.zero_state(1)
    with pytest.raises(ValueError, match=r"missing \['state_0'\], unexpected \['fold_0'\]"):
        engine.step(x, {"fold_0" if k == "state_0" else k: v for k, v in state.items()})
    with pytest.raises(ValueError, match="state must be a mapping name -> array .* got list"):
        engine.step(x, list(state.values()))
    with pytest.raises(ValueError, match="'state_0' holds 2 streams but the frame batch has 1"):
        engine.step(x, engine.zero_state(2))
    fold, h, w = engine.state_spec[1].shape
    wrong = dict(state, state_1=torch.zeros(1, fold + 1, h, w))
    with pytest.raises(ValueError, match=r"'state_1' must have shape \(1, "):
        engine.step(x, wrong)
    reordered = dict(reversed(list(state.items())))
    logits, _ = engine.step(x, reordered)  # the same names in another order: accepted
    assert scaled_diff(logits, engine.step(x, state)[0]) == 0


def test_torch_engine_step_rejects_frames_of_another_dtype_or_size(engine):
    with pytest.raises(ValueError, match=r"float32 \[B, 3, H, W\] array with H = W = 32, got float64 \(1, 3, 32, 32\)"):
        engine.step(np.zeros((1, 3, SIZE, SIZE)), engine.zero_state(1))
    with pytest.raises(ValueError, match=r"got float32 \(1, 3, 64, 64\)"):
        engine.step(np.zeros((1, 3, 64, 64), np.float32), engine.zero_state(1))


def test_online_runner_state_of_gives_a_streams_named_state_without_unbatching(engine):
    runner = OnlineRunner(engine)
    assert runner.state_of("a") is None
    logits = runner.step(["a", "b"], [0, 0], np.concatenate([_frames(0, 1)[0], _frames(1, 1)[0]]))
    state = runner.state_of("b")
    assert list(state) == list(engine.state_names) and all(v.shape[0] == 1 for v in state.values())
    _, alone = engine.step(_frames(1, 1)[0], engine.zero_state(1))
    assert max(scaled_diff(state[n].numpy(), alone[n].numpy()) for n in engine.state_names) <= 1e-4
    assert logits.shape == (2, 4)
