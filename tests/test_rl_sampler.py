import copy
import json
import logging

import numpy as np
import pytest

from ript_ds.env.base import TaskSpec
from ript_ds.rl.sampler import SmartSampler, split_init_states
from ript_ds.rl.types import Context, Episode, Group, GroupOutcome

K = 4


def _tasks(n_tasks=3, n_init=10):
    return [TaskSpec("synthetic", i, f"t{i}", f"do {i}", 50, n_init) for i in range(n_tasks)]


def _outcome(ctx, successes, crashed=None, steps_each=10):
    crashed = crashed or (False,) * len(successes)
    return GroupOutcome(ctx, tuple(successes), tuple(crashed), steps_each * len(successes))


def _group(ctx, successes, crash_at=None):
    eps = [
        Episode(
            context=ctx,
            seed=k,
            images=np.zeros((1, 1, 2, 2, 3), np.uint8),
            states=np.zeros((1, 2), np.float32),
            actions=np.zeros((5, 7), np.float32),
            replan_steps=np.array([0]),
            success=s,
            length=5,
            failure_reason="worker crash" if k == crash_at else None,
        )
        for k, s in enumerate(successes)
    ]
    return Group(ctx, eps)


def test_k_below_two_is_a_config_error():
    with pytest.raises(ValueError, match="K"):
        SmartSampler(_tasks(), rollouts_per_context=1, seed=0)


def test_draws_are_deterministic_for_a_seed_and_depend_on_it():
    a, b, c = (SmartSampler(_tasks(), K, seed=s) for s in (1, 1, 2))
    draws_a = [a.next_contexts(5) for _ in range(4)]
    assert draws_a == [b.next_contexts(5) for _ in range(4)]
    assert draws_a != [c.next_contexts(5) for _ in range(4)]


def test_sampler_does_not_touch_global_rng():
    np.random.seed(0)
    expected = np.random.rand()
    np.random.seed(0)
    SmartSampler(_tasks(), K, seed=3).next_contexts(7)
    assert np.random.rand() == expected


def test_no_repeats_within_a_draw_until_exhausted():
    s = SmartSampler(_tasks(n_tasks=2, n_init=3), K, seed=0)  # 6 contexts
    assert len(set(s.next_contexts(6))) == 6
    many = s.next_contexts(13)  # two full passes and one more
    counts = {c: many.count(c) for c in set(many)}
    assert len(counts) == 6 and sorted(counts.values()) == [2, 2, 2, 2, 2, 3]


def test_held_out_split_is_disjoint_and_deterministic():
    assert split_init_states(10, num_eval_init_states=3) == (list(range(7)), [7, 8, 9])
    assert split_init_states(10, eval_fraction=0.25) == (list(range(8)), [8, 9])  # floor(2.5) = 2
    with pytest.raises(ValueError, match="none for training"):
        split_init_states(2, num_eval_init_states=2)
    with pytest.raises(ValueError, match="not both"):
        split_init_states(10, num_eval_init_states=1, eval_fraction=0.1)
    s = SmartSampler(_tasks(), K, seed=0, num_eval_init_states=3)
    assert len(s.train_contexts) == 21 and len(s.eval_contexts) == 9
    assert not set(s.train_contexts) & set(s.eval_contexts)
    assert not set(s.next_contexts(100)) & set(s.eval_contexts)
    with pytest.raises(ValueError, match="not a training context"):
        s.record([_outcome(Context(0, 9), [True, False, True, False])])


def test_filter_counts():
    s = SmartSampler(_tasks(), K, seed=0)
    c = Context(0, 0)
    groups = [
        _group(c, [True, False, True, True]),
        _group(c, [True] * 4),
        _group(c, [False] * 4),
        _group(c, [False] * 4),
        _group(c, [True, False, False, False], crash_at=2),
        _group(c, [False, True, False, False]),
    ]
    res = s.filter(groups)
    assert res.kept == [groups[0], groups[5]]
    assert res.dropped_all_success == [groups[1]]
    assert res.dropped_all_fail == groups[2:4]
    assert res.dropped_crashed == [groups[4]]
    with pytest.raises(ValueError, match="K=4"):
        s.filter([_group(c, [True, False])])


def _run_phase(sampler, target, cap, succeed):
    """Simulated rollouts: succeed(context, k) -> bool."""
    phase = sampler.start_phase(target_groups=target, max_attempts=cap)
    while not phase.done:
        contexts = sampler.next_contexts(phase.num_to_draw())
        phase.record([_outcome(c, [succeed(c, k) for k in range(K)]) for c in contexts])
    return phase


def test_refill_until_target():
    # task 0 contexts are mixed, task 1 always succeeds, task 2 always fails: 1/3 of groups are kept
    # in expectation, so a target of 6 needs several rounds but far fewer than 50.
    s = SmartSampler(_tasks(), K, seed=0)
    phase = _run_phase(
        s, target=6, cap=50, succeed=lambda c, k: c.task_id == 1 or (c.task_id == 0 and k == 0)
    )
    st = phase.stats()
    assert phase.done and not phase.capped and phase.should_update
    assert st.groups_kept >= 6 and 1 < st.attempts < 50
    assert st.groups_sampled == st.groups_kept + st.dropped_all_success + st.dropped_all_fail
    assert st.efficiency == st.groups_kept / st.groups_sampled
    assert st.env_steps == st.groups_sampled * K * 10
    assert st.env_steps_per_kept_group == st.env_steps / st.groups_kept
    assert s.groups_recorded == st.groups_sampled


def test_attempt_cap_when_every_group_is_uniform(caplog):
    s = SmartSampler(_tasks(), K, seed=0)
    with caplog.at_level(logging.WARNING, logger="ript_ds.rl.sampler"):
        phase = _run_phase(s, target=4, cap=3, succeed=lambda c, k: False)
    st = phase.stats()
    assert phase.done and phase.capped and not phase.should_update
    assert (st.attempts, st.groups_sampled, st.groups_kept, st.dropped_all_fail) == (3, 12, 0, 12)
    assert st.efficiency == 0.0 and st.env_steps_per_kept_group is None
    assert "sampler/env_steps_per_kept_group" not in st.metrics()
    assert st.metrics()["sampler/dropped_all_fail"] == 12.0
    assert "skip this update" in caplog.text
    with pytest.raises(RuntimeError):
        phase.record([])


def test_empty_phase_stats_do_not_divide_by_zero():
    st = SmartSampler(_tasks(), K, seed=0).start_phase(2, 1).stats()
    assert st.groups_sampled == 0 and st.efficiency == 0.0 and st.env_steps_per_kept_group is None


def test_history_skips_crashes_and_is_bounded():
    s = SmartSampler(_tasks(), K, seed=0, history_len=6)
    c = Context(1, 2)
    s.record([_outcome(c, [True, False, True, True], crashed=[False, True, False, False])])
    assert s.history(c) == (True, True, True)
    s.record([_outcome(c, [False, False, True, False])])
    assert s.history(c) == (True, True, False, False, True, False)[-6:]
    s.record([_outcome(c, [True, True, True, True])])
    assert s.history(c) == (False, True, False, True, True, True, True)[-6:]


def test_skip_solved_after():
    s = SmartSampler(_tasks(n_tasks=1, n_init=3), K, seed=0, history_len=2, skip_solved_after=6)
    solved, c1 = Context(0, 0), Context(0, 1)
    s.record([_outcome(solved, [True] * 4)])
    assert not s.is_solved(solved)  # only 4 of the required 6 successes so far
    s.record([_outcome(solved, [True] * 4), _outcome(c1, [False, True, True, True])])
    assert s.is_solved(solved) and not s.is_solved(c1)
    assert solved not in s.next_contexts(20)
    # every context solved: draws fall back to all of them instead of failing
    s.record([_outcome(c, [True] * 4) for c in (c1, c1, Context(0, 2), Context(0, 2))])
    assert s.eligible_contexts() == []
    assert len(s.next_contexts(3)) == 3


def test_mixed_bonus_favours_mixed_contexts():
    s = SmartSampler(_tasks(n_tasks=1, n_init=2), K, seed=0, mixed_bonus=9.0)
    mixed, plain = Context(0, 0), Context(0, 1)
    s.record([_outcome(mixed, [True, False, False, False]), _outcome(plain, [False] * 4)])
    firsts = [s.next_contexts(1)[0] for _ in range(400)]
    # P(mixed) = 10 / 11 ~ 0.91 against 0.5 without the bonus
    assert 0.85 < firsts.count(mixed) / 400 < 0.96


def test_state_dict_round_trip_mid_run_gives_identical_draws():
    def fresh():
        return SmartSampler(_tasks(), K, seed=5, num_eval_init_states=2, skip_solved_after=4, mixed_bonus=1.0)

    a = fresh()
    succeed = lambda c, k: (c.init_state_idx + k) % 3 == 0  # noqa: E731
    _run_phase(a, target=3, cap=5, succeed=succeed)
    # through JSON, as a checkpoint's client state would store it
    state = json.loads(json.dumps(a.state_dict()))
    b = fresh()
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    for _ in range(3):
        pa = _run_phase(a, target=3, cap=5, succeed=succeed)
        pb = _run_phase(b, target=3, cap=5, succeed=succeed)
        assert pa.stats() == pb.stats()
    assert a.next_contexts(10) == b.next_contexts(10)
    assert a.state_dict() == b.state_dict()
    other = SmartSampler(_tasks(), K, seed=5, num_eval_init_states=3)
    with pytest.raises(ValueError, match="different training contexts"):
        other.load_state_dict(copy.deepcopy(state))


def test_same_record_calls_give_equal_state_on_every_rank():
    # Two "ranks": each draws the same global list, takes its share, and records the same gathered list.
    world = 2
    ranks = [SmartSampler(_tasks(), K, seed=9, skip_solved_after=4, mixed_bonus=2.0) for _ in range(world)]
    for it in range(5):
        draws = [r.next_contexts(6) for r in ranks]
        assert draws[0] == draws[1]
        shares = [draws[r][r::world] for r in range(world)]
        local = [
            [_outcome(c, [(c.init_state_idx + k + it) % 2 == 0 for k in range(K)]) for c in s] for s in shares
        ]
        gathered = [o for rank_outcomes in local for o in rank_outcomes]
        for r in ranks:
            r.record(gathered)
    assert ranks[0].state_dict() == ranks[1].state_dict()
    assert ranks[0].groups_recorded == 30
