"""MR-SP with 2 sequence-parallel ranks against the single-process path: sharded video encoding
(stage 1) and the Ulysses prefill (stage 2) give the same embeddings, log-probs, entropies and
summed parameter gradients; and Qwen2.5-VL-7B's heads (28 query, 4 KV) at sp 8 on 8 processes.
Run: python -m pytest tests/test_mr_sp.py -q

The workers are this file under torchrun; rank 0 writes what they measured as JSON:
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/test_mr_sp.py OUT.json
    python -m torch.distributed.run --standalone --nproc_per_node 8 tests/test_mr_sp.py OUT.json 7b"""
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the torchrun command runs this file from tests/
from torch.distributed.fsdp import FSDPModule

import data as D
import grpo
import model as M
import mr_sp

from test_model import CONFIGS  # two configs of each family; B: GQA with 1 KV head (< sp)
from test_model import gdn_in_float64

# (samples, response lengths) per micro-batch: left padding with rank 0 holding no response column;
# a response that straddles the ranks' boundary; an image and a text-only row beside a video; one
# unpadded row (the causal-only path)
V, I = "video", "image"
CASES = [(((V, (4, 8, 8)), (V, (2, 4, 6))), (5, 2)), (((V, (1, 4, 4)), (V, (2, 4, 4))), (60, 33)),
         (((I, (1, 4, 6)), (None, ()), (V, (2, 4, 4))), (6, 9, 3)), (((V, (3, 8, 8)),), (7,))]
ENCODE_GRIDS = [(5, 8, 8), (3, 4, 6), (1, 8, 8)]  # uneven splits; one rank with no temporal group


def max_diff(a, b):
    return (a - b).abs().max().item()


def rows_of(model, tok, specs, lengths, group):
    """Rows as grpo.py builds them (`prepare`: with a group, each rank holds its share of the visual
    embeddings)."""
    g, rows = torch.Generator().manual_seed(1), []
    for i, ((kind, grid), n) in enumerate(zip(specs, lengths)):
        s = M.random_samples(model, [grid], kind, seed=i)[0]
        rows.append(dict(mr_sp.prepare(model, tok, s, f"Question {i}: what happens here?", group),
                         response=torch.randint(20, 500, (n,), generator=g).tolist()))  # no vision ids
    return rows


def gathered(rows, group):
    """The rows with their whole visual embeddings, as one process holds them."""
    return [dict(r, visual=mr_sp.gather_visual(r["visual"], r["shares"], group), shares=None) for r in rows]


def group_rows(model, tok, lengths, group, grid=(4, 8, 8)):
    """One prompt's rows (the same prompt object, as grpo.py's), responses of these lengths."""
    g, s = torch.Generator().manual_seed(3), M.random_samples(model, [grid], "video", seed=7)[0]
    p = mr_sp.prepare(model, tok, s, "Question: what happens here?", group)
    return [dict(p, response=torch.randint(20, 500, (n,), generator=g).tolist()) for n in lengths]


def logprobs_and_grads(model, tok, rows, group, packed=True):
    lp, ent, mask = mr_sp.logprobs(model, tok, rows, temperature=0.9, sp_group=group,
                                            packed=packed)
    w = torch.randn(lp.shape, generator=torch.Generator().manual_seed(2))
    (((lp * w + 0.1 * ent) * mask).sum() / mask.sum()).backward()  # a token mean, as in grpo.py
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            if group is not None:  # each rank holds its share: the sum over the group is the gradient
                if p.grad is None:  # an untied lm_head on a rank with no response column
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad, group=group)
            grads[name] = p.grad.clone()
    model.zero_grad(set_to_none=True)
    return lp.detach(), ent.detach(), mask, grads


def compare(model, tok, grids, lengths, group, single=True, packed=False):
    """One case's log-probs, entropies and summed gradients with the group against one process (run
    where `single`; elsewhere None: at sp 8 on 2 cores, rank 0 alone computes the reference).
    packed: grids is one prompt's, whose rows run packed with the group, row by row without."""
    rows = (group_rows(model, tok, lengths, group, grids) if packed else
            rows_of(model, tok, grids, lengths, group))
    lp2, ent2, _, g2 = logprobs_and_grads(model, tok, rows, group)
    rows = gathered(rows, group)  # (every rank: a collective)
    if not single:
        return None
    lp1, ent1, mask, g1 = logprobs_and_grads(model, tok, rows, None, packed=False)
    P, valid = max(len(x["prompt"]) for x in rows), mask.bool()  # padding's values are arbitrary
    return dict(
        columns=P + max(lengths) - 1, logprob=max_diff(lp1[valid], lp2[valid]),
        entropy=max_diff(ent1[valid], ent2[valid]), worst=max(g1, key=lambda k: max_diff(g1[k], g2[k])),
        grad=max(max_diff(g1[k], g2[k]) for k in g1), grad_scale=max(g1[k].abs().max().item() for k in g1),
        finite=bool(torch.isfinite(lp2[valid]).all()))


@contextlib.contextmanager
def host_reads(count):
    """Counts reads of tensor values on the host (bool, int, float, item, tolist) into count[0]: on
    a GPU each waits for the device to finish its queue."""
    names = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")
    saved = {n: torch.Tensor.__dict__.get(n) for n in names}

    def counting(f):
        def read(self, *a):
            count[0] += 1
            return f(self, *a)
        return read

    for n in names:
        setattr(torch.Tensor, n, counting(getattr(torch.Tensor, n)))
    try:
        yield count
    finally:
        for n, f in saved.items():
            if f is None:
                delattr(torch.Tensor, n)
            else:
                setattr(torch.Tensor, n, f)


def sp1_outputs(model, tok):
    """Log-probs and greedy rollout tokens without a group."""
    rows = rows_of(model, tok, *CASES[0], None)
    with torch.no_grad():
        lp = mr_sp.logprobs(model, tok, rows)[0]
    toks = mr_sp.rollout(model, tok, rows, 1, max_new=8, temperature=0)[0]
    return lp, toks


def worker(out):
    par = mr_sp.init_parallel(2)
    rank, group = par.rank, par.sp_group
    res = {}
    for name, (family, cfg) in CONFIGS.items():
        # Qwen3.5 in float64, its delta rule too: in fp32 the rule rounds differently with the heads
        # a rank holds, up to 1.5e-5 in a gradient; in float64 within 2e-7
        gdn, stack = "3.5" in name, contextlib.ExitStack()
        if gdn:
            stack.enter_context(gdn_in_float64())
        model, tok = M.load(family, **cfg, dtype=torch.float64 if gdn else torch.float32)
        grpo.rl_params(model)
        r = res[name] = {"encode": [], "cases": []}
        for grid in ENCODE_GRIDS:
            s = M.random_samples(model, [grid])[0]
            one, mine = mr_sp.encode_visual(model, s), mr_sp.encode_visual(model, s, group)
            shares = mr_sp.shares_of(model.config, s["grid_thw"], 2)
            two = mr_sp.gather_visual(mine, shares, group)
            r["encode"].append(dict(grid=grid, equal=torch.equal(one, two), diff=max_diff(one, two),
                                    shape=list(two.shape), held=[len(mine), shares[rank]]))
        if gdn:  # an SP rollout: GDN states gathered from the ranks' heads (sp_prefill)
            samples = [M.random_samples(model, [grid], kind, seed=i)[0]
                       for i, (kind, grid) in enumerate(CASES[2][0])]
            rows = [mr_sp.prepare(model, tok, s, "Why?", group) for s in samples]  # 39, 31, 57 tokens
            kw = dict(seeds=[5, 6, 7], max_new=12, temperature=0.7, top_p=0.9)
            one = mr_sp.rollout(model, tok, gathered(rows, group), 4, **kw)
            two = mr_sp.rollout(model, tok, rows, 4, sp_group=group, **kw)
            r["sp_rollout"] = dict(tokens=torch.equal(one[0], two[0]) and torch.equal(one[2], two[2]),
                                   logprob=max_diff(one[1], two[1]),
                                   distinct=len({tuple(x.tolist()) for x in one[0]}))
        before = sp1_outputs(model, tok)
        r["cases"] = [compare(model, tok, grids, lengths, group) for grids, lengths in CASES]
        r["cases"].append(compare(model, tok, (4, 8, 8), (5, 9, 1, 7), group, packed=True))
        # after the switch to "ulysses", calls without a group are SDPA exactly as before (rollouts)
        r["sp1_unchanged_by_switch"] = all(torch.equal(x, y) for x, y in zip(before, sp1_outputs(model, tok)))
        stack.close()
    # a video file read as an SP share (data.VideoDataset with sp): each rank keeps and encodes
    # its frames' rows only; the gathered embeddings are the whole video's
    model, tok = M.load("tiny")
    rng = np.random.default_rng(0)
    video = str(Path(out).parent / f"clip{rank}.mp4")
    D.write_mp4(video, D.synth_frames(D.synth_scenario(rng, "order", 8), 24, 56, rng), 8)
    res["share"] = []
    for n in (10, 2):  # 5 temporal groups: 3 + 2; 1 group: rank 1 holds none
        kw = dict(nframes=n, max_pixels=56 * 56, proc=M.processor_config(model.config))
        whole = D.VideoDataset([dict(video=video)], **kw)[0]
        mine = D.VideoDataset([dict(video=video)], sp=(rank, 2), **kw)[0]
        one = mr_sp.encode_visual(model, whole)
        two = mr_sp.gather_visual(mr_sp.encode_visual(model, mine, group),
                                  mr_sp.shares_of(model.config, mine["grid_thw"], 2), group)
        got, mine = [None, None], dict(share=mine["share"], rows=len(mine["pixel_values"]),
                                       diff=max_diff(one, two), shape=list(two.shape))
        torch.distributed.all_gather_object(got, mine)
        res["share"].append(got)
    try:
        mr_sp.encode_visual(model, D.VideoDataset([dict(video=video)], sp=(rank, 2), **kw)[0])
        res["share_without_group"] = None
    except ValueError as e:
        res["share_without_group"] = str(e)
    # each SP peer samples G/sp of every prompt's G: together the samples one process draws
    model, tok = M.load("tiny")
    rows, kw = rows_of(model, tok, *CASES[0], group), dict(seeds=[5, 6], max_new=12, temperature=0.7, top_p=0.9)
    one = mr_sp.rollout(model, tok, gathered(rows, group), 4, **kw)
    two = mr_sp.rollout(model, tok, rows, 4, sp_group=group, **kw)
    cache, mask, _ = mr_sp._prefill_one(model, rows[0], torch.device("cpu"), group, 1024)
    res["sp_cache"] = dict(columns=cache.layers[0].keys.shape[2], mask=mask.shape[1], prompt=len(rows[0]["prompt"]))
    res["sp_rollout"] = dict(tokens=torch.equal(one[0], two[0]) and torch.equal(one[2], two[2]),
                             logprob=max_diff(one[1], two[1]), distinct=len({tuple(t.tolist()) for t in one[0]}))
    # activation checkpointing: the same summed gradients at sp 1 and 2 (train mode: it is off in eval)
    model, tok = M.load("tiny")
    grpo.rl_params(model)
    model.train()
    rows, packed = rows_of(model, tok, *CASES[1], group), group_rows(model, tok, (6, 2, 9), group)
    runs = [(gathered(x, group), None) for x in (rows, packed)] + [(rows, group), (packed, group)]
    plain = [logprobs_and_grads(model, tok, r, g)[3] for r, g in runs]
    model.gradient_checkpointing_enable()
    ckpt = [logprobs_and_grads(model, tok, r, g)[3] for r, g in runs]
    res["checkpointing_grad_diff"] = [max(max_diff(a[k], b[k]) for k in a) for a, b in zip(plain, ckpt)]
    # FSDP: rollouts in `unsharded` (each rank decoding its own number of steps: per-layer gathers
    # would hang) sample what the replicated model samples
    model, tok = M.load("tiny", tie=False)  # as Qwen2.5-VL-7B: its embeddings are a unit too
    grpo.rl_params(model)
    rows, n = rows_of(model, tok, *CASES[0], None), 3 + 6 * rank
    # and an untied model (embeddings: a unit of their own) trains as the replicated one
    untied, _ = M.load("tiny", tie=False)
    grpo.rl_params(untied)
    untied.train()
    train_rows, one_prompt = rows_of(untied, tok, *CASES[1], None), group_rows(untied, tok, (6, 2, 9), None)
    want_g = logprobs_and_grads(untied, tok, train_rows, None)[3]
    want_pg = logprobs_and_grads(untied, tok, one_prompt, None, packed=False)[3]
    run = mr_sp.shard(untied)

    def fsdp_grads(rows):  # (packed where the rows are one prompt's)
        hook = untied.model.language_model.layers[0].register_forward_hook(
            lambda m, a, o: res.setdefault("fsdp_rows_a_pass", []).append(a[0].shape[0]))
        lp, ent, mask = run(mr_sp.logprobs, untied, tok, rows, 0.9)
        hook.remove()
        w = torch.randn(lp.shape, generator=torch.Generator().manual_seed(2))
        (((lp * w + 0.1 * ent) * mask).sum() / mask.sum() / 2).backward()  # both ranks: the same rows
        got = {k: p.grad.full_tensor() for k, p in untied.named_parameters() if p.requires_grad}
        untied.zero_grad(set_to_none=True)
        return got

    got_g, got_pg = fsdp_grads(train_rows), fsdp_grads(one_prompt)
    res["fsdp_untied_grad_diff"] = max(max_diff(want_g[k], got_g[k]) for k in want_g)
    res["fsdp_packed_grad_diff"] = max(max_diff(want_pg[k], got_pg[k]) for k in want_pg)
    res["fsdp_untied_units"] = sum(isinstance(m, FSDPModule) for m in untied.modules())
    want = mr_sp.rollout(model, tok, rows, 2, seeds=[1, 2], max_new=n, temperature=0.7, top_p=0.9)
    run = mr_sp.shard(model)
    got = mr_sp.unsharded(run, mr_sp.rollout, model, tok, rows, 2, seeds=[1, 2], max_new=n,
                          temperature=0.7, top_p=0.9)
    same = torch.tensor([float(all(torch.equal(a, b) for a, b in zip(want, got)))])
    res["fsdp_rollout_equal_on_all_ranks"] = bool(mr_sp.all_reduce(same) == 2)
    res["fsdp_rollout_lengths"] = [want[0].shape[1], got[0].shape[1]]
    # groups of 3 query heads over 3 KV heads do not split over 2 ranks: each padded to 4
    model, tok = M.load("tiny", hidden=144, heads=9, kv_heads=3, layers=1, vision_hidden=64, vision_heads=2)
    grpo.rl_params(model)
    res["padded_heads"] = [compare(model, tok, *CASES[c], group) for c in (0, 3)]
    # the host reads of a pass (a device sync each on GPU) do not grow with the layers: the
    # right-padded-or-not decision is made once a pass, not in every layer's attention
    res["host_reads"] = {}
    for layers in (1, 3):
        model, tok = M.load("tiny", layers=layers)
        for c in (0, 3):  # left padding (the masked path); one unpadded row (causal only)
            rows = rows_of(model, tok, *CASES[c], group)
            with torch.no_grad(), host_reads([0]) as n:
                mr_sp.logprobs(model, tok, rows, sp_group=group)
                mr_sp.rollout(model, tok, rows, 1, max_new=1, temperature=0, sp_group=group)
            res["host_reads"][f"{layers} layers, case {c}"] = n[0]
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    mr_sp.shutdown()


def worker_7b(out):
    """At sp 8, the real models' head layouts. Qwen2.5-VL-7B's attention (28 query heads, 4 KV heads,
    untied): groups of 7 query heads padded to 8, KV heads repeated to 8. Qwen3.5-9B's miniature (16
    query, 4 KV heads; GDN layers' 16 key and 32 value heads: 2 and 4 a rank), in float64 as the
    2-process worker runs Qwen3.5. Three cases each: left padding (rank 0 holds no response column),
    one unpadded row, one prompt's rows packed; a greedy rollout prefilled under SP."""
    par = mr_sp.init_parallel(8)
    first, res = par.rank == 0, {}
    for name in ("qwen2.5-vl-7b", "qwen3.5-9b"):
        gdn = name == "qwen3.5-9b"
        with gdn_in_float64() if gdn else contextlib.nullcontext():
            model, tok = (M.load("tiny:qwen3.5-9b", dtype=torch.float64) if gdn else
                          M.load("tiny", hidden=448, heads=28, kv_heads=4, layers=2, tie=False))
            grpo.rl_params(model)
            r = res[name] = dict(cases=[compare(model, tok, *CASES[c], par.sp_group, first) for c in (0, 3)]
                                 + [compare(model, tok, (2, 8, 8), (6, 3, 9), par.sp_group, first, packed=True)])
            rows = rows_of(model, tok, *CASES[0], par.sp_group)
            got = mr_sp.rollout(model, tok, rows, 1, max_new=8, temperature=0, sp_group=par.sp_group)
            rows = gathered(rows, par.sp_group)
            if first:
                want = mr_sp.rollout(model, tok, rows, 1, max_new=8, temperature=0)
                r["rollout"] = dict(tokens=torch.equal(want[0], got[0]) and torch.equal(want[2], got[2]),
                                    logprob=max_diff(want[1], got[1]), length=got[0].shape[1])
    if first:
        with open(out, "w") as f:
            json.dump(res, f)
    mr_sp.shutdown()


def launch(tmp_path_factory, n, *args):
    out = tmp_path_factory.mktemp("mr_sp") / "out.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), __file__, str(out)]
    p = subprocess.run([sys.executable, *cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, f"workers failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    print(f"{n} workers: {time.time() - t0:.1f} s")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    return launch(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def measured_7b(tmp_path_factory):
    return launch(tmp_path_factory, 8, "7b")


@pytest.mark.parametrize("config", list(CONFIGS))
def test_sharded_encoding_equals_unsharded_exactly(measured, config):
    """Equal up to float rounding: no family's vision tower mixes temporal groups, but on some CPUs a
    matmul over fewer rows rounds differently (bit-identical on one machine, up to 7.9e-6 on another,
    where encoding each temporal group alone differs from the whole video by as much). Qwen3-VL's
    rows carry its DeepStack features too (width (1 + k) * hidden)."""
    enc = measured[config]["encode"]
    assert all(e["diff"] <= 1e-5 for e in enc), enc
    assert [e["shape"][0] for e in enc] == [5 * 16, 3 * 6, 16]
    assert [e["held"] for e in enc] == [[3 * 16] * 2, [2 * 6] * 2, [16] * 2]  # rank 0's share, kept
    family, cfg = CONFIGS[config]
    k = cfg.get("vision_depth", 2) - 1 if family == "tiny-qwen3-vl" else 0
    assert {e["shape"][1] for e in enc} == {cfg.get("hidden", 192) * (1 + k)}


def test_sp_share_of_a_video_file_encodes_as_the_whole_video(measured):
    """Each rank holds only its share of the pixel rows (an empty one too); the embeddings all ranks
    get equal one process encoding the whole video (up to float rounding, as above)."""
    for got, shares, rows in zip(measured["share"], ([[0, 3], [3, 2]], [[0, 1], [1, 0]]),
                                 ([48, 32], [16, 0])):  # 16 rows (4 tokens) a temporal group
        assert [g["share"] for g in got] == shares and [g["rows"] for g in got] == rows, got
        assert all(g["diff"] <= 1e-5 and g["shape"][0] == sum(rows) // 4 for g in got), got
    assert measured["share_without_group"].startswith("a sample holding an SP rank's share")


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_packed_rows_equal_row_by_row(config, ckpt):
    """One prompt's rows run packed (the prompt's columns once, each response attending to them and
    to itself) give the row-by-row log-probs, entropies and gradients, with activation
    checkpointing too; the decoder then sees one sequence of P + B*T - 1 columns, not B of P + T.
    Qwen3.5's GDN layers run the prompt once and each response from the prompt's final state and
    last convolution inputs (`mr_sp.ulysses_gdn`), in float64 here: the delta rule's 64-token
    chunks fall elsewhere in a response than in its row, which fp32 rounds differently (2e-6 to
    1e-5); sp 2: test_ulysses_logprobs_and_grads_equal_single_process's packed case."""
    family, cfg = CONFIGS[config]
    gdn = "3.5" in config
    with gdn_in_float64() if gdn else contextlib.nullcontext():
        check_packed(*M.load(family, **cfg, dtype=torch.float64 if gdn else torch.float32), ckpt)


def check_packed(model, tok, ckpt):
    grpo.rl_params(model)
    model.train()
    if ckpt:
        model.gradient_checkpointing_enable()
    rows, seen = group_rows(model, tok, (5, 9, 1, 7), None), []
    hook = model.model.language_model.layers[0].register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    lp1, ent1, mask, g1 = logprobs_and_grads(model, tok, rows, None, packed=False)
    lp2, ent2, mask2, g2 = logprobs_and_grads(model, tok, rows, None)
    hook.remove()
    P, v = len(rows[0]["prompt"]), mask.bool()
    assert seen[0][:2] == (4, P + 9 - 1) and seen[-1][:2] == (1, P + 4 * 9 - 1), seen
    assert torch.equal(mask, mask2) and mask.sum(1).tolist() == [5, 9, 1, 7]
    assert max_diff(lp1[v], lp2[v]) <= 1e-5 and max_diff(ent1[v], ent2[v]) <= 1e-5
    assert max(max_diff(g1[k], g2[k]) for k in g1) <= 1e-5 and max(x.abs().max() for x in g1.values()) > 1e-3


def test_sp_rollout_of_gdn_layers_equals_one_process(measured):
    """Qwen3.5 at sp 2 (T 0.7, top-p 0.9, G 4 split over the peers, 2 prompts): each GDN layer's
    state after the prompt, prefilled by Ulysses (its padding skipped) and gathered from the ranks'
    heads, decodes the tokens one process samples; log-probs within the fp32 log-softmax's rounding."""
    for name in [n for n in CONFIGS if n.startswith("qwen3.5")]:
        r = measured[name]["sp_rollout"]
        assert r["tokens"] and r["logprob"] <= 2e-6 and r["distinct"] > 4, (name, r)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_ulysses_logprobs_and_grads_equal_single_process(measured, config):
    """Each case at sp 2 against one process; the last, one prompt's rows packed at sp 2 against
    them row by row in one process. Qwen3.5's GDN layers by their own all-to-all (`ulysses_gdn`;
    config A's 3 key heads over sp 2: repeated for their 6 value heads)."""
    cases = measured[config]["cases"]
    assert any(c["columns"] % 2 for c in cases)  # a sequence that needs padding to a multiple of sp
    for c in cases:
        assert c["finite"] and c["logprob"] <= 1e-5 and c["entropy"] <= 1e-5, c
        assert c["grad"] <= 1e-5 and c["grad_scale"] > 1e-3, c  # gradients that are not all ~0
    assert measured[config]["sp1_unchanged_by_switch"]


def test_heads_padded_to_whole_groups_equal_single_process(measured):
    """9 query heads over 3 KV heads at sp 2 (a zero head added to each group, dropped after)."""
    for c in measured["padded_heads"]:
        assert c["finite"] and c["logprob"] <= 1e-5 and c["entropy"] <= 1e-5, c
        assert c["grad"] <= 1e-5 and c["grad_scale"] > 1e-3, c


@pytest.mark.parametrize("name", ["qwen2.5-vl-7b", "qwen3.5-9b"])
def test_real_heads_at_sp8_equal_single_process(measured_7b, name):
    """Qwen2.5-VL-7B's 28 query and 4 KV heads, Qwen3.5-9B's 16 and 4 with its GDN layers' 16 key
    and 32 value heads, on 8 ranks: log-probs, entropies, summed gradients and greedy rollout tokens
    (prefilled with Ulysses; a GDN layer's state gathered from the 8 ranks' heads) as one process
    computes them."""
    for c in measured_7b[name]["cases"]:
        assert c["finite"] and c["logprob"] <= 1e-5 and c["entropy"] <= 1e-5, c
        assert c["grad"] <= 1e-5 and c["grad_scale"] > 1e-3, c
    r = measured_7b[name]["rollout"]
    assert r["tokens"] and r["logprob"] <= 1e-5 and r["length"] > 1, r


def test_no_host_sync_per_layer(measured):
    """A pass with 3 layers reads tensor values on the host as often as with 1."""
    n = measured["host_reads"]
    assert all(n[f"3 layers, case {c}"] == n[f"1 layers, case {c}"] for c in (0, 3)), n


def test_ulysses_heads_split_whole_groups():
    """Each rank gets H'/sp query heads that are whole groups over its K'/sp KV heads (repeated
    whole), with the fewest zero heads that allow it; none where the heads already split."""
    assert mr_sp.ulysses_heads(28, 4, 8) == (32, 8)  # Qwen2.5-VL-7B: groups of 7 -> 8
    assert mr_sp.ulysses_heads(16, 2, 8) == (16, 8) and mr_sp.ulysses_heads(28, 4, 4) == (28, 4)
    for K in range(1, 9):
        for g in range(1, 9):
            for sp in range(1, 17):
                Hp, Kp = mr_sp.ulysses_heads(K * g, K, sp)
                rep, gp = Kp // K, Hp // K
                assert Kp % K == 0 and Kp % sp == 0 and Hp % Kp == 0 and Hp % sp == 0
                assert gp % rep == 0 and g <= gp < g + rep and (gp == g) == (g % rep == 0)


def test_sp_peers_split_the_samples(measured):
    """Rollout with the SP group (2 samples of each prompt's 4 per peer, exchanged) = without it."""
    r = measured["sp_rollout"]
    assert r["tokens"] and r["logprob"] <= 1e-5 and r["distinct"] == 8, r


def test_sp_peers_hold_their_columns_of_the_prompt_cache(measured):
    """A rank keeps its columns' keys and values (the decode attends over the group), never the
    whole prompt's: at a long video's length that is the rollout's largest tensor (28 GiB at 8,192
    frames for Qwen2.5-VL-7B)."""
    c = measured["sp_cache"]
    assert c["columns"] == c["mask"] == -(-c["prompt"] // 2) and c["prompt"] > 100, c


def test_activation_checkpointing_gradients_equal(measured):
    """Every decoder layer recomputed in backward: the unchecked gradients, sp 1 and sp 2 (fp32), rows
    of two prompts side by side and one prompt's rows packed."""
    assert len(measured["checkpointing_grad_diff"]) == 4
    assert all(d <= 1e-6 for d in measured["checkpointing_grad_diff"]), measured["checkpointing_grad_diff"]


def test_fsdp_rollout_gathers_once_and_equals_replicated(measured):
    assert measured["fsdp_rollout_equal_on_all_ranks"] and measured["fsdp_rollout_lengths"][1] > 1


def test_fsdp_untied_gradients_equal_replicated(measured):
    """Untied embeddings are an FSDP unit of their own, lm_head sits in the root (3 layers + 1, vision
    frozen, plus the root): the summed gradients of a training pass equal the replicated model's."""
    assert measured["fsdp_untied_units"] == 3 + 1 and measured["fsdp_untied_grad_diff"] <= 1e-6
    assert measured["fsdp_packed_grad_diff"] <= 1e-5  # one prompt's rows packed (float order), against row by row
    # and packed indeed: one sequence a pass (FSDP's input cast rebuilt the rows, unpacking them)
    assert measured["fsdp_rows_a_pass"] == [2, 1], measured["fsdp_rows_a_pass"]


def test_bad_configs_fail_clearly(monkeypatch):
    """SystemExit with one line: the scripts print it and stop, no traceback."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match=r"^world size 3 is not divisible by --sp 2: world = dp x sp needs a whole "
                                         r"number of data-parallel groups, dp = 3/2$"):
        mr_sp.init_parallel(2)


@pytest.mark.parametrize("cuda", [False, True])
def test_process_group_serves_cpu_tensors_on_every_device(cuda, monkeypatch):
    """Metric sums, sample lengths and counts are CPU tensors in every run: on CUDA the process group
    needs a CPU backend beside NCCL ("nccl" alone maps only cuda: the first all-reduce of a CPU tensor
    raises "No backend type associated with device type cpu"). init_distributed run with CUDA faked."""
    from torch.distributed.distributed_c10d import Backend, BackendConfig
    got = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: got.append(backend))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    device = mr_sp.init_distributed()[2]
    backends = BackendConfig(Backend(got[0])).get_device_backend_map()
    assert device.type == ("cuda" if cuda else "cpu") and {"cpu", device.type} <= backends.keys()
    assert backends[device.type] == ("nccl" if cuda else "gloo")


@pytest.mark.parametrize("script", ["sft.py", "grpo.py", "eval.py"])
def test_bad_sp_is_one_line_at_start(script):
    """The scripts stop before loading anything, with the message alone on stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    p = subprocess.run([sys.executable, script, "--sp", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == ["world size 1 is not divisible by --sp 2: world = dp x sp needs a whole "
                                             "number of data-parallel groups, dp = 1/2"]


if __name__ == "__main__":
    (worker_7b if sys.argv[2:] == ["7b"] else worker)(sys.argv[1])


@pytest.mark.parametrize("ckpt", [False, True])
def test_planner_within_20_percent_of_measured_training_pass(ckpt):
    """mr_sp.plan's training pass (tiny model, one row of a 2,048-frame video: 4,196 tokens, with and without
    activation checkpointing) against the peak resident memory bench.py measures for it in a fresh process
    (bench.py planner checks whole steps: tiny and small, sp 1 and 2, each option). Not shorter: a fixed cost of
    about 40 MB that the planner does not model is a fifth of a checkpointed 2,148-token pass."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    p = subprocess.run([sys.executable, "bench.py", "prefill", "--config", "tiny", "--frames", "2048",
                        "--" + "no-" * (not ckpt) + "activation-checkpointing"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    est = mr_sp.plan(mr_sp.plan_config("tiny"), 2048, 1, 56 * 56, got["tokens"] - got["video_tokens"] - 64, 1, 64, 1,
                     "float32", ckpt=ckpt)["training_pass"] / 2**30
    assert 0.8 <= est / got["pass_gb_per_rank"] <= 1.2, (est, got)
