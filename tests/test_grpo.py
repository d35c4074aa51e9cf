"""GRPO math against hand-computed values, rollout/trainer consistency, and fault handling.

    python -m pytest tests/test_grpo.py -q"""
import math
import os

import pytest
import torch

import data as D
import grpo
import model as M
import mr_sp


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.2, 0.2, 0.2, 0.6])
    a = grpo.group_advantages(r, 4)
    s1 = math.sqrt(4 * 0.25 / 3)  # unbiased std of (1, 0, 0, 1)
    s2 = math.sqrt((3 * 0.1 ** 2 + 0.3 ** 2) / 3)  # mean 0.3
    expect = [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, -0.1 / s2, -0.1 / s2, -0.1 / s2, 0.3 / s2]
    assert torch.allclose(a, torch.tensor(expect), atol=1e-5)
    assert torch.equal(grpo.group_advantages(torch.ones(4), 4), torch.zeros(4))  # equal rewards: no signal


def test_policy_loss_clipping_both_sides_and_dual_clip():
    old = torch.zeros(5, 1)
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.1, 5.0])[:, None]
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0, -1.0])
    pg, clipped = grpo.policy_loss(ratio.log(), old, adv, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    # 1.5, A>0: clipped at 1.28. 0.5, A>0: unclipped -0.5 (pessimistic bound). 0.5, A<0: clipped at 0.8.
    # 1.1, A<0: inside the range, 2.2. 5.0, A<0: -A*ratio = 5 bounded by the dual clip at 3.
    assert torch.allclose(pg[:, 0], torch.tensor([-1.28, -0.5, 0.8, 2.2, 3.0]), atol=1e-6)
    assert clipped[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    pg_nodual, _ = grpo.policy_loss(ratio.log(), old, adv, 0.2, 0.28, dual_clip=0)
    assert abs(pg_nodual[4, 0].item() - 5.0) < 1e-5


def test_kl_estimators_hand_computed():
    logp, ref = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    assert torch.allclose(grpo.kl_estimate(logp, ref, "k1"), torch.tensor([1.0, -2.0]))
    assert torch.allclose(grpo.kl_estimate(logp, ref, "k2"), torch.tensor([0.5, 2.0]))
    k3 = torch.tensor([math.exp(-1) + 1 - 1, math.exp(2) - 2 - 1])
    assert torch.allclose(grpo.kl_estimate(logp, ref, "k3"), k3)
    assert grpo.kl_estimate(torch.tensor([-30.0]), torch.tensor([0.0]), "k3").item() == 10.0  # clamped


def test_loss_aggregations_hand_computed():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert grpo.aggregate(x, mask, "token", 4, 2).item() == pytest.approx(10 / 4)
    assert grpo.aggregate(x, mask, "seq", 4, 2).item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    # a micro-batch contributes its share of the global mean: halves add up to the whole
    halves = sum(grpo.aggregate(x[i:i + 1], mask[i:i + 1], "token", 4, 2) for i in range(2))
    assert halves.item() == pytest.approx(10 / 4)


def test_prompt_positions_worked_example():
    """The docstring's example: contiguous blocks per rank first, then dynamic-sampling refills strided."""
    assert grpo.prompt_positions(100, 0, 2, 3, 0, 5) == [100, 101, 102, 106, 108]
    assert grpo.prompt_positions(100, 1, 2, 3, 0, 3) + grpo.prompt_positions(100, 1, 2, 3, 3, 2) == \
        [103, 104, 105, 107, 109]
    # one process reading both ranks' blocks in order gets the same prompts as the two ranks
    assert grpo.prompt_positions(100, 0, 1, 6, 0, 6) == list(range(100, 106))


@pytest.mark.parametrize("text,acc,fmt", [
    ("<think>red first</think><answer>B</answer>", 1.0, 1.0),
    ("<think>x</think>\n <answer> (b) </answer>", 1.0, 1.0),
    ("<answer>B</answer>", 1.0, 0.0),                       # right answer, no reasoning: format fails
    ("<think>x</think><answer>C</answer>", 0.0, 1.0),
    ("<think>x</think><answer>B</answer> trailing", 1.0, 0.0),  # fullmatch: nothing after the answer
    ("<think>unterminated", 0.0, 0.0),
    ("", 0.0, 0.0),
])
def test_reward_letters(text, acc, fmt):
    r = D.reward(text, {"answer": "B"})
    assert (r["accuracy"], r["format"]) == (acc, fmt)
    assert r["overall"] == pytest.approx(0.9 * acc + 0.1 * fmt)


def test_grade_numbers_and_text():
    assert D.grade("3.0", "3") == 1.0 and D.grade("3.5", "3") == 0.0
    assert D.grade(" Top Left ", "top left") == 1.0 and D.grade("top", "top left") == 0.0


@pytest.fixture(scope="module")
def rollout_batch():
    model, tok = M.load("tiny")
    batch = [mr_sp.prepare(model, tok, s, f"Question {i}: what happens in this video?")
             for i, s in enumerate(M.random_samples(model, ((4, 8, 8), (2, 4, 6))))]
    G = 4
    toks, lps, lens = mr_sp.rollout(model, tok, batch, G, [mr_sp.seed_of(0, i) for i in range(2)], max_new=24,
                                    temperature=1.0)
    rows = [dict(batch[j // G], response=toks[j, :lens[j]].tolist(), adv=1.0 - (j % 2)) for j in range(2 * G)]
    return model, tok, rows, lps, lens


def test_trainer_logprobs_equal_rollout_engine(rollout_batch):
    """The prefill pass scores the engine's samples as the engine did (Long-RL's right padding and
    restarted response positions fail this), with rows of both prompts mixed in one micro-batch."""
    model, tok, rows, lps, lens = rollout_batch
    with torch.no_grad():
        lp, _, mask = mr_sp.prefill_logprobs(model, tok, rows)
    assert mask.sum(1).tolist() == lens.tolist()
    assert (lp - lps[:, :lp.shape[1]])[mask.bool()].abs().max() <= 1e-5


def test_first_update_ratio_is_exactly_one(rollout_batch):
    model, tok, rows, _, _ = rollout_batch
    micro = [rows[:3], rows[3:]]
    args = type("A", (), dict(temperature=1.0))
    old = grpo.no_grad_logprobs(mr_sp.call, model, tok, micro, args)
    for mb, o in zip(micro, old):
        lp, _, mask = mr_sp.prefill_logprobs(model, tok, mb)  # with grad, as the update runs it
        assert lp.requires_grad and torch.equal((lp - o).exp()[mask.bool()], torch.ones(int(mask.sum())))


def test_reference_equals_policy_at_step_0(rollout_batch, tmp_path):
    """The reference as grpo.py loads it scores like the policy before any update (k3 exactly 0), in fp32 and
    under --dtype bfloat16's autocast (a reference stored in bf16 was off by up to 0.12 on the tiny model)."""
    model, tok, rows, _, _ = rollout_batch
    M.save(model, tok, str(tmp_path))
    policy, ref = M.load(str(tmp_path))[0], grpo.load_ref(str(tmp_path), "cpu")
    args, lps = type("A", (), dict(temperature=0.9)), {}
    for bf16 in (False, True):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            (lp,), (ref_lp,) = (grpo.no_grad_logprobs(mr_sp.call, m, tok, [rows], args) for m in (policy, ref))
        assert grpo.kl_estimate(lp, ref_lp, "k3").abs().max() == 0 and torch.equal(lp, ref_lp)
        lps[bf16] = lp
    assert (lps[True] - lps[False]).abs().max() > 1e-3  # bf16 did compute in bf16


def update_args(**kw):
    base = dict(epochs=1, mini_batches=1, temperature=1.0, clip_low=0.2, clip_high=0.28, dual_clip=3.0,
                kl="k3", kl_coef=0.0, agg="token", grad_clip=1.0)
    return type("A", (), {**base, **kw})


def test_update_moves_weights_and_nan_loss_skips_the_update(rollout_batch, capsys):
    model, tok, rows, _, _ = rollout_batch
    model = M.load("tiny")[0]  # a private copy: this test changes weights
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    micro, args, stats = [rows[:4], rows[4:]], update_args(), {"skipped_updates": 0}
    before = [p.detach().clone() for p in params]
    old = grpo.no_grad_logprobs(mr_sp.call, model, tok, micro, args)
    old[1] = old[1].clone()
    old[1][0, 0] = float("nan")  # a NaN reaches the loss
    grpo.update(args, grpo.Policy(model, tok, params, opt), micro, old, None, stats)
    assert stats["skipped_updates"] == 1 and "update skipped" in capsys.readouterr().err
    assert all(torch.equal(a, p) for a, p in zip(before, params))  # weights untouched
    old = grpo.no_grad_logprobs(mr_sp.call, model, tok, micro, args)
    with torch.no_grad():
        ents = [mr_sp.prefill_logprobs(model, tok, mb)[1:] for mb in micro]
    mean_entropy = sum(float((e * m).sum()) for e, m in ents) / sum(float(m.sum()) for _, m in ents)
    log = grpo.update(args, grpo.Policy(model, tok, params, opt), micro, old, None, stats)
    assert stats["skipped_updates"] == 1 and log["clip_frac"] == 0.0  # ratio 1: nothing clipped
    assert log["entropy"] == pytest.approx(mean_entropy, rel=1e-5)  # a token mean over the whole batch
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


def test_score_rejects_non_finite_reward():
    with pytest.raises(ValueError, match="non-finite"):
        grpo.score(lambda text, row: float("nan"), "x", {})
    assert grpo.score(lambda text, row: 0.5, "x", {}) == {"overall": 0.5}


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path):
    model, tok = M.load("tiny")
    out = str(tmp_path / "model")
    M.save(model, tok, out, write=lambda d: torch.save({"step": 1}, os.path.join(d, "state.pt")))

    def crash(d):
        raise KeyboardInterrupt  # killed while writing the next checkpoint

    with pytest.raises(KeyboardInterrupt):
        M.save(model, tok, out, write=crash)
    path, state = M.resume(out)
    assert path == out and state["step"] == 1
    os.replace(out, out + ".old")  # killed between save()'s two renames
    path, state = M.resume(out)
    assert path == out + ".old" and state["step"] == 1


class _Exploit:
    def __reduce__(self):  # unpickling this would run a shell command
        return (os.system, ("echo pwned > /dev/null",))


def test_resume_loads_state_without_running_code(tmp_path):
    """state.pt loads with weights_only: a pickled object that would run code is refused."""
    model, tok = M.load("tiny")
    out = str(tmp_path / "model")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    state = {"opt": opt.state_dict(), "step": 3, "cursor": 24, "stats": {"bad_samples": 1}}
    M.save(model, tok, out, write=lambda d: torch.save(state, os.path.join(d, "state.pt")))
    _, loaded = M.resume(out)
    assert loaded["step"] == 3 and loaded["stats"] == {"bad_samples": 1}
    k = next(iter(state["opt"]["state"]))
    assert torch.equal(loaded["opt"]["state"][k]["exp_avg"], state["opt"]["state"][k]["exp_avg"])
    torch.save({"step": _Exploit()}, os.path.join(out, "state.pt"))
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        M.resume(out)
