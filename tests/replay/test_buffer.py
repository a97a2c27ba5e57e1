"""ReplayMemory: reservoir against a slow reference, balanced shares, caps, determinism, state round trip."""

from __future__ import annotations

import pytest
import torch

from hf_adaptive.replay import ReplayMemory
from hf_adaptive.utils.io import load_state, save_state


def _rows(task_id: int, n: int) -> list[dict]:
    """Rows whose first token encodes (task, index), of varying lengths."""
    return [{"input_ids": [1000 * task_id + i] + [7] * (i % 4), "labels": [-100] + [7] * (i % 4)} for i in range(n)]


def _key(item) -> int:
    return int(item["input_ids"][0])


def reference_reservoir(stream: list[int], capacity: int, seed: int) -> list[int]:
    """Algorithm R written out plainly, drawing j ~ U{0..n} from the same seeded generator."""
    g = torch.Generator().manual_seed(seed)
    slots: list[int] = []
    for n, x in enumerate(stream):
        if len(slots) < capacity:
            slots.append(x)
        else:
            j = int(torch.randint(n + 1, (1,), generator=g).item())
            if j < capacity:
                slots[j] = x
    return slots


@pytest.mark.parametrize("seed", [0, 3])
def test_reservoir_matches_slow_reference(seed):
    mem = ReplayMemory(20, policy="reservoir", seed=seed)
    stream = []
    for t, n in enumerate([37, 5, 41]):
        mem.add(f"task{t}", _rows(t, n))
        stream += [1000 * t + i for i in range(n)]
    assert [_key(it) for _, it in mem.items()] == reference_reservoir(stream, 20, seed)
    assert [task for task, it in mem.items()] == [f"task{_key(it) // 1000}" for _, it in mem.items()]
    assert mem.total_seen == 83 and len(mem) == 20


def test_reservoir_is_a_uniform_sample():
    """After n offers every example is kept with probability capacity / n (here 5 / 20)."""
    counts = torch.zeros(20)
    trials = 400
    for seed in range(trials):
        mem = ReplayMemory(5, policy="reservoir", seed=seed)
        mem.add("a", _rows(0, 8))
        mem.add("b", _rows(1, 12))
        for _, it in mem.items():
            k = _key(it)
            counts[k if k < 1000 else 8 + k - 1000] += 1
    freq = counts / trials
    assert float((freq - 0.25).abs().max()) < 0.09  # ~4 standard deviations of one frequency


def test_balanced_shares_and_caps():
    mem = ReplayMemory(10, policy="balanced", seed=0)
    mem.add("a", _rows(0, 30))
    assert mem.counts() == {"a": 10}
    mem.add("b", _rows(1, 30))
    assert mem.counts() == {"a": 5, "b": 5}
    mem.add("c", _rows(2, 30))
    assert mem.counts() == {"a": 4, "b": 3, "c": 3}  # 10 = 4 + 3 + 3, the extra slot to the oldest task
    mem.add("d", _rows(3, 2))  # a small task keeps all it has; the others keep their shares
    assert mem.counts() == {"a": 3, "b": 3, "c": 2, "d": 2}
    assert len(mem) <= mem.capacity
    for task, item in mem.items():  # every item belongs to its task, no duplicates
        assert "abcd"[_key(item) // 1000] == task
    keys = [_key(it) for _, it in mem.items()]
    assert len(set(keys)) == len(keys)


def test_balanced_shrink_keeps_a_uniform_sample():
    """Task a (12 rows) shrinks from 4 slots to 2 when b arrives: each a row is kept with probability 2/12."""
    counts = torch.zeros(12)
    trials = 400
    for seed in range(trials):
        mem = ReplayMemory(4, policy="balanced", seed=seed)
        mem.add("a", _rows(0, 12))
        mem.add("b", _rows(1, 12))
        for task, it in mem.items():
            if task == "a":
                counts[_key(it)] += 1
    assert counts.sum() == 2 * trials
    assert float((counts / trials - 2 / 12).abs().max()) < 0.08


def test_streaming_into_one_task_in_pieces_equals_one_call():
    one = ReplayMemory(6, policy="balanced", seed=1)
    one.add("a", _rows(0, 20))
    pieces = ReplayMemory(6, policy="balanced", seed=1)
    rows = _rows(0, 20)
    pieces.add("a", rows[:7])
    pieces.add("a", rows[7:])
    assert [_key(i) for _, i in one.items()] == [_key(i) for _, i in pieces.items()]


@pytest.mark.parametrize("policy", ["reservoir", "balanced"])
def test_determinism_with_seed(policy):
    def build(seed):
        mem = ReplayMemory(8, policy=policy, seed=seed)
        mem.add("a", _rows(0, 30))
        mem.add("b", _rows(1, 30))
        return [_key(i) for _, i in mem.items()], [r["input_ids"][0] for r in mem.sample(5)]

    assert build(7) == build(7)
    assert build(7) != build(8)


def test_sample_without_replacement_and_task_filter():
    mem = ReplayMemory(10, policy="balanced", seed=0)
    mem.add("a", _rows(0, 5))
    mem.add("b", _rows(1, 5))
    rows = mem.sample(100)
    assert len(rows) == 10 and len({r["input_ids"][0] for r in rows}) == 10
    assert {r["task_name"] for r in mem.sample(4, tasks=["b"])} == {"b"}
    assert all(len(r["input_ids"]) == len(r["labels"]) for r in rows)
    assert mem.nbytes() == sum(8 * len(r["input_ids"]) for r in rows)


@pytest.mark.parametrize("policy", ["reservoir", "balanced"])
def test_state_round_trip_continues_identically(policy, tmp_path):
    mem = ReplayMemory(9, policy=policy, seed=2)
    mem.add("a", _rows(0, 25))
    mem.add("b", _rows(1, 13))
    save_state(tmp_path / "mem", mem.state_dict())
    restored = ReplayMemory(9, policy=policy, seed=123)
    restored.load_state_dict(load_state(tmp_path / "mem"))
    for m in (mem, restored):
        m.add("c", _rows(2, 17))
    assert [(t, i["input_ids"].tolist(), i["labels"].tolist()) for t, i in mem.items()] == [
        (t, i["input_ids"].tolist(), i["labels"].tolist()) for t, i in restored.items()
    ]
    assert mem.sample(4) == restored.sample(4)
    assert restored.seen == mem.seen and restored.total_seen == mem.total_seen


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match=r"ReplayMemory.capacity=0 is not allowed"):
        ReplayMemory(0)
    with pytest.raises(ValueError, match=r"ReplayMemory.policy='fifo' is not allowed"):
        ReplayMemory(3, policy="fifo")
    mem = ReplayMemory(3)
    with pytest.raises(ValueError, match="lacks"):
        mem.add("a", [{"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="mismatched"):
        mem.add("a", [{"input_ids": [1, 2], "labels": [1]}])
    other = ReplayMemory(4, policy="reservoir")
    with pytest.raises(ValueError, match="differ"):
        other.load_state_dict(mem.state_dict())
