"""The run skeleton sft.py, grpo.py and flow_grpo.py share (mr_sp.py): the optimizer step, the
checkpoint's training state, FSDP's equal passes, and one wording for the flags they share.

    python -m pytest tests/test_skeleton.py -q"""
import torch

import flow_grpo
import grpo
import mr_sp
import sft


def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def test_optimizer_step_clips_applies_and_zeroes():
    """The norm returned is the one before clipping, the update is AdamW's at the given lr on the
    clipped gradients, and no gradient is left for the next step."""
    model, opt = _model_and_opt()
    ref, ref_opt = _model_and_opt()
    x = torch.randn(5, 4)
    (model(x) ** 2).sum().mul(100).backward()
    (ref(x) ** 2).sum().mul(100).backward()
    norm = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.5)
    for g in ref_opt.param_groups:
        g["lr"] = 3e-3
    ref_opt.step()
    gn, skipped = mr_sp.optimizer_step(list(model.parameters()), opt, 0.5, lr=3e-3)
    assert not skipped and gn == float(norm) and gn > 0.5
    assert opt.param_groups[0]["lr"] == 3e-3
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_optimizer_step_skips_a_non_finite_norm():
    """A NaN gradient changes no weight and no AdamW state, and is cleared."""
    model, opt = _model_and_opt()
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    gn, skipped = mr_sp.optimizer_step(list(model.parameters()), opt, 1.0)
    assert skipped and gn != gn
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not opt.state and all(p.grad is None for p in model.parameters())


def test_save_state_then_load_state_resumes():
    """save_state's training state, loaded into a new optimizer, gives the same optimizer state and
    the step saved; no state: step 0."""
    model, opt = _model_and_opt()
    model(torch.randn(2, 4)).sum().backward()
    mr_sp.optimizer_step(list(model.parameters()), opt, 1.0)
    sd, state = mr_sp.save_state(model, opt, step=7, cursor=3)
    assert sd is None and state["step"] == 7 and state["cursor"] == 3
    fresh = torch.optim.AdamW(model.parameters(), lr=1.0)
    assert mr_sp.load_state(model, fresh, None) == 0 and not fresh.state
    assert mr_sp.load_state(model, fresh, state) == 7
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][k][n], b["state"][k][n]) for k in a["state"] for n in a["state"][k])


def test_equal_passes_pads_with_weight_0_copies(monkeypatch):
    """Sharded, a rank short of passes (another rank has 3 in update 0, 1 in update 1) runs the most
    any rank has, the extra ones weight-0 copies of its first micro-batch; replicated, nothing."""
    parts = [[[{"id": 1}, {"id": 2}]], [[{"id": 3}]]]
    assert mr_sp.equal_passes(parts, False) is parts
    monkeypatch.setattr(mr_sp, "all_reduce", lambda x, op="sum": torch.maximum(x, torch.tensor([3, 1])))
    out = mr_sp.equal_passes(parts, True)
    assert [len(p) for p in out] == [3, 1]
    assert out[0][0] == parts[0][0] and out[1] == parts[1]
    assert out[0][1] == out[0][2] == [{"id": 1, "keep": 0.0}, {"id": 2, "keep": 0.0}]


def test_shared_flags_read_the_same():
    """A flag the stages share says the same in each (they drifted: --sp was "seq-parallel degree"
    in one and "ranks per SP group" in another)."""
    helps = {}
    for ap in (sft.ap, grpo.ap, flow_grpo.ap):
        for a in ap._actions:
            helps.setdefault(a.dest, []).append(a.help)
    for flag in ("sp", "fsdp", "dtype", "resume", "save_every", "activation_checkpointing", "grad_clip",
                 "data", "max_pixels", "micro_batch"):
        texts = helps[flag][:2] if flag in ("data", "micro_batch") else helps[flag]  # flow's: prompts
        assert len(set(texts)) == 1, (flag, texts)


def test_autocast_is_bf16_only_when_asked_and_uncached():
    """--dtype bfloat16: matmuls in bf16 over fp32 weights, with no weight cache (it would keep step
    1's bf16 weights to the region's end); float32: untouched."""
    model = torch.nn.Linear(4, 3)
    with mr_sp.autocast(torch.device("cpu"), "bfloat16"):
        assert model(torch.randn(2, 4)).dtype == torch.bfloat16
        assert not torch.is_autocast_cache_enabled()
    with mr_sp.autocast(torch.device("cpu"), "float32"):
        assert model(torch.randn(2, 4)).dtype == torch.float32
    assert model.weight.dtype == torch.float32
