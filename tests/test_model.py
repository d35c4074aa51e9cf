"""model.py against its references: transformers' own forward, hand-computed positions, the naive
generate, a full-vocabulary log-softmax.   Run: python -m pytest tests/test_model.py -q"""
import contextlib
import json
import math
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import model as M
from data import audio_tokens

# Two tiny configurations of each family that differ in what could break: head counts, GQA ratio,
# vision depth (Qwen3-VL: 1 or 2 DeepStack features), vision window attention (Qwen2.5-VL: B's
# 56-pixel window splits a 112-pixel frame into 4 windows in blocks 0 and 2), depth.
FAMILIES = ["tiny-qwen2.5-vl", "tiny-qwen2-vl", "tiny-qwen3-vl", "tiny-qwen3.5"]
B = dict(hidden=128, heads=4, kv_heads=1, layers=2, vision_hidden=64, vision_heads=2, vision_depth=3,
         window=56, fullatt=(1,))
# Qwen3.5's B: its layer types in another order (GDN, attention, GDN: A's are GDN x 3, attention) and
# 2 GDN key heads, 4 value heads (A's 3 and 6: Ulysses at sp 2 splits B's as they are, repeats A's)
CONFIGS = {f"{f[5:]}-{c}": (f, kw) for f in FAMILIES for c, kw in (
    ("A", {}), ("B", dict(B, layers=3, attention_every=2, kv_heads=2) if "3.5" in f else B))}


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny(request):
    family, kw = CONFIGS[request.param]
    return M.load(family, **kw)


@pytest.fixture(scope="module")
def tiny_a():
    return M.load("tiny")


@contextlib.contextmanager
def gdn_in_float64():
    """transformers' Gated DeltaNet delta rule (both forms) computing in float64: its source with its
    fp32 casts made float64, for checks whose fp32 rounding would blur what they test."""
    import inspect
    import transformers.models.qwen3_5.modeling_qwen3_5 as Q
    names = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "l2norm")
    saved = {n: getattr(Q, n) for n in names}
    for n in names:
        ns = dict(vars(Q))
        exec(inspect.getsource(saved[n]).replace("torch.float32", "torch.float64"), ns)
        setattr(Q, n, ns[n])
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(Q, n, f)


def tol(model):
    """Log-prob tolerance of the engine against a recompute. Qwen3.5's delta rule runs in fp32
    whatever the model's dtype, in a chunked form (prefill, a whole forward) and a step form
    (decode) that round differently, more with more threads: up to 1.6e-5 seen over 32 tokens,
    2e-6 with the rule in float64 (`test_gdn_decode_equals_recompute_in_float64`)."""
    return 3e-5 if model.config.model_type == "qwen3_5" else 1e-5


def video_inputs(model, tok, grids, seed=0, kind="video"):
    """Samples of random pixels, their prompts, visual embeddings (each encoded alone, as the stages
    do) and positions."""
    samples = M.random_samples(model, grids, kind, seed)
    prompts, pos = zip(*[M.prompt_of(tok, model.config, s, f"Question {i}: what happens in this video?")
                         for i, s in enumerate(samples)])
    visual = [M.encode_pixels(model, s["pixel_values"], s["grid_thw"]) if kind else None for s in samples]
    return samples, list(prompts), list(pos), visual


def test_tokenizer_is_deterministic_and_round_trips(tmp_path):
    a, b = M.tiny_tokenizer(), M.tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    text = "<think>red, then blue.</think><answer>B</answer><|im_end|>"
    ids = a.encode(text, add_special_tokens=False)
    assert a.decode(ids) == text
    assert ids[-1] == a.convert_tokens_to_ids("<|im_end|>") == a.eos_token_id
    a.save_pretrained(tmp_path)
    from transformers import AutoTokenizer
    c = AutoTokenizer.from_pretrained(tmp_path)
    assert c.encode(text, add_special_tokens=False) == ids
    cfg = M.tiny_config(a)
    assert M.build_prompt(c, cfg, "Why?", "video", [[1, 2, 10]]) == M.build_prompt(a, cfg, "Why?", "video", [[1, 2, 10]])


@pytest.mark.parametrize("kind", ["video", "image"])
def test_build_prompt_places_visual_tokens(kind):
    tok = M.tiny_tokenizer()
    ids = M.build_prompt(tok, M.tiny_config(tok), "What happens?", kind, [[1, 2, 14]])
    pad = tok.convert_tokens_to_ids(f"<|{kind}_pad|>")
    first = ids.index(pad)
    assert ids.count(pad) == 7 and ids[first:first + 7] == [pad] * 7
    assert ids[first - 1] == tok.convert_tokens_to_ids("<|vision_start|>")
    assert ids[first + 7] == tok.convert_tokens_to_ids("<|vision_end|>")
    assert tok.decode(ids).endswith("What happens?<|im_end|>\n<|im_start|>assistant\n")
    text = M.build_prompt(tok, M.tiny_config(tok), "What happens?")
    assert tok.decode(text) == tok.decode(ids).replace(f"<|vision_start|>{tok.decode([pad]) * 7}<|vision_end|>", "")


def test_build_prompt_qwen3_vl_timestamps():
    """Qwen3-VL: each temporal group after "<t seconds>" (t the mean time of its 2 frames, one
    decimal, tokenized alone), in its own start/end pair; no outer pair (the trained format)."""
    tok = M.tiny_tokenizer()
    cfg = M.tiny_config(tok, "qwen3_vl")
    ids = M.build_prompt(tok, cfg, "Why?", "video", [[3, 2, 4]], [0.0, 0.5, 1.0, 1.5, 2.25, 3.0])
    s = tok.decode(ids)
    g = "<|vision_start|>" + "<|video_pad|>" * 2 + "<|vision_end|>"
    assert f"user\n<0.2 seconds>{g}<1.2 seconds>{g}<2.6 seconds>{g}Why?<|im_end|>" in s  # .25 -> .2, 1.25 -> 1.2
    assert M.build_prompt(tok, cfg, "Why?", "video", [[3, 2, 4]], [0.0] * 6, expand=False) == \
        tok.encode(s.split("<0.2")[0], add_special_tokens=False) + [cfg.video_token_id] + \
        tok.encode("Why?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)


def test_positions_hand_computed_original_rule(tiny_a):
    model, tok = tiny_a
    cfg = model.config  # tokens_per_second = 2
    t, v = 11, cfg.video_token_id
    # text(2) video grid (4 groups, 2x2 patches -> 1x1 merged) text(1), 0.75 s per group:
    # temporal = int(i * 0.75 * 2) = 0, 1, 3, 4 -> video at 2 + those; text resumes at max + 1 = 7.
    # video 2: grid (2, 4, 6) -> 2x2x3 merged at 1 s per group: temporal 0, 2.
    ids = [t, t, v, v, v, v, t] + [v] * 12 + [t, t]
    pos = M.positions(ids, [[4, 2, 2], [2, 4, 6]], [0.75, 1.0], cfg)
    s = 7 + 1  # second video starts after the text token at 7
    second = [[s + tt, s + hh, s + ww] for tt in (0, 2) for hh in range(2) for ww in range(3)]
    expect = ([[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 2, 2], [5, 2, 2], [6, 2, 2], [7, 7, 7]] + second
              + [[s + 3, s + 3, s + 3], [s + 4, s + 4, s + 4]])
    assert pos.T.tolist() == expect


def test_positions_hand_computed_qwen2_vl_and_qwen3_vl():
    tok = M.tiny_tokenizer()
    # Qwen2-VL: temporal index i, whatever the seconds per group (no tokens_per_second)
    cfg = M.tiny_config(tok, "qwen2_vl")
    t, v, im = 11, cfg.video_token_id, cfg.image_token_id
    pos = M.positions([t, t, v, v, v, v, t], [[4, 2, 2]], [0.75], cfg)
    assert pos.T.tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 2, 2], [4, 2, 2], [5, 2, 2], [6, 6, 6]]
    # Qwen3-VL: each temporal group of grid (2, 4, 4) is its own 1x2x2 run (timestamps between
    # them in the prompt), temporal offset 0; the text after each resumes at max + 1
    cfg = M.tiny_config(tok, "qwen3_vl")
    pos = M.positions([t, v, v, v, v, t, v, v, v, v, t], [[2, 4, 4]], [3.0], cfg)
    assert pos.T.tolist() == [[0, 0, 0], [1, 1, 1], [1, 1, 2], [1, 2, 1], [1, 2, 2], [3, 3, 3],
                              [4, 4, 4], [4, 4, 5], [4, 5, 4], [4, 5, 5], [6, 6, 6]]
    # Qwen3.5: Qwen3-VL's rule, one-group grids (time is in the text)
    assert torch.equal(M.positions([t, v, v, v, v, t, v, v, v, v, t], [[2, 4, 4]], [3.0],
                                   M.tiny_config(tok, "qwen3_5")), pos)
    # an image is a one-group grid (same rule in every family): (1, 2x4 merged) at 1, text at 5
    pos = M.positions([t] + [im] * 8 + [t], [[1, 4, 8]], [1.0], cfg)
    assert pos.T.tolist()[-1] == [5, 5, 5] and pos[:, 1:9].tolist() == [
        [1] * 8, [1, 1, 1, 1, 2, 2, 2, 2], [1, 2, 3, 4, 1, 2, 3, 4]]


@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-qwen3.5"])
def test_positions_vs_transformers(family):
    """Qwen2.5-VL: equal to transformers' get_rope_index where the rules agree (one temporal group),
    different where they do not (text after a multi-group video): that difference is the pitfall
    we avoid. Qwen3-VL's (and Qwen3.5's) grids are one group each: the rules always agree there."""
    model, tok = M.load(family)
    cfg = model.config
    for grid, same in (([1, 4, 6], True), ([3, 4, 6], cfg.model_type in M.QWEN3)):
        ids = M.build_prompt(tok, cfg, "Which color came first?", "video", [grid], [0.5 * k for k in range(2 * grid[0])])
        ours = M.positions(ids, [grid], [2.0], cfg)
        ids_t = torch.tensor([ids])
        types = (ids_t == cfg.video_token_id).int() * 2
        kw = dict(second_per_grid_ts=torch.tensor([2.0])) if cfg.model_type == "qwen2_5_vl" else {}
        theirs, _ = model.model.get_rope_index(ids_t, types, video_grid_thw=torch.tensor([grid]), **kw)
        assert torch.equal(ours, theirs[:, 0]) == same
        video = ids_t[0] == cfg.video_token_id
        assert torch.equal(ours[:, video], theirs[:, 0, video])  # video tokens agree in both cases


def test_positions_temporal_index_in_vllm_arithmetic(tiny_a):
    """vLLM forms int(i * (second_per_grid * tokens_per_second)) in float64. float32, as this file
    computed it before, gives group 7 at 31/14 s per group (tokens_per_second 2) the temporal index 30
    instead of 31, and rollout and training disagree there (tests/test_vllm.py: log-probs off by 1.1)."""
    model, tok = tiny_a
    ids = M.build_prompt(tok, model.config, "?", "video", [[8, 2, 2]])  # one token per temporal group
    t = M.positions(ids, [[8, 2, 2]], [31 / 14], model.config)[0, torch.tensor(ids) == model.config.video_token_id]
    assert (t - t[0]).tolist() == [0, 4, 8, 13, 17, 22, 26, 31]
    assert (torch.arange(8) * (31 / 14) * 2).long().tolist()[-1] == 30


def test_positions_reject_mismatched_grid(tiny_a):
    model, tok = tiny_a
    ids = M.build_prompt(tok, model.config, "?", "video", [[1, 4, 6]])
    with pytest.raises(ValueError, match="run 0: 6 visual pad tokens but grid"):
        M.positions(ids, [[2, 4, 4]], [1.0], model.config)
    with pytest.raises(ValueError, match="1 visual grids but 0 runs"):
        M.positions(ids[:3], [[2, 4, 4]], [1.0], model.config)


@pytest.mark.parametrize("kind,grids", [("video", ((4, 8, 8), (2, 4, 6))), ("video", ((1, 8, 8),)),
                                        ("image", ((1, 8, 12),)), (None, [()])])
def test_our_path_equals_transformers_forward_from_pixels(tiny, kind, grids):
    """Our visual embeddings (DeepStack features included) and logits from cached embeddings,
    spliced, at our positions, vs transformers' get_*_features and full forward from pixels."""
    model, tok = tiny
    samples, prompts, pos, visual = video_inputs(model, tok, grids, kind=kind)
    with torch.no_grad():
        for s, ids, p, vis in zip(samples, prompts, pos, visual):
            ids_t, p = torch.tensor([ids]), p[:, None]
            if kind:
                assert (vis - M.reference_features(model, s)).abs().max() <= 1e-5
            ours = model.lm_head(M.forward(model, M.splice(model, ids_t, vis), p))
            assert (ours - M.reference_logits(model, ids_t, p, s)).abs().max() <= 1e-5


def test_text_only_equals_transformers(tiny):
    model, tok = tiny
    text = tok.apply_chat_template([{"role": "user", "content": "Count the flashes."}], tokenize=False)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    pos = M.positions(ids[0], [], [], model.config)
    assert torch.equal(pos, torch.arange(ids.shape[1]).expand(3, -1))
    with torch.no_grad():
        ours = model.lm_head(M.forward(model, M.splice(model, ids, None), pos[:, None]))
        ref = model(input_ids=ids).logits  # transformers' own text positions
    assert (ours - ref).abs().max() <= 1e-5


def test_splice_rejects_count_mismatch(tiny_a):
    model, tok = tiny_a
    ids = torch.tensor([M.build_prompt(tok, model.config, "?", "video", [[1, 4, 4]])])
    with pytest.raises(ValueError, match="4 visual pad tokens but 3 visual embeddings"):
        M.splice(model, ids, torch.zeros(3, model.config.text_config.hidden_size))


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_folder_loads_in_transformers_with_same_logits(family, tmp_path):
    model, tok = M.load(family)
    M.save(model, tok, str(tmp_path / "ckpt"))
    M.save(model, tok, str(tmp_path / "ckpt"))  # overwriting an existing checkpoint works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .tmp/.old left behind
    from transformers import AutoModelForImageTextToText
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "ckpt").eval()
    assert type(loaded) is type(model)
    samples, prompts, pos, _ = video_inputs(model, tok, ((2, 8, 8),))
    ids, p = torch.tensor(prompts[:1]), pos[0][:, None]
    with torch.no_grad():
        assert torch.equal(M.reference_logits(model, ids, p, samples[0]), M.reference_logits(loaded, ids, p, samples[0]))
    model2, _ = M.load(str(tmp_path / "ckpt"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_load_rejects_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        M.load(str(tmp_path))


def batch(model, tok, grids, responses=None, kind="video"):
    samples, prompts, pos, visual = video_inputs(model, tok, grids, kind=kind)
    ids, p3, mask, P = M.layout(prompts, pos, responses, pad_id=tok.pad_token_id)
    vis = torch.cat(visual) if kind else None
    return M.splice(model, ids, vis), p3, mask, P, ids, (samples, prompts, pos, visual)


def gen_kwargs(tok, **kw):
    return dict(eos_ids=[tok.eos_token_id], banned=M.banned_ids(tok), pad_id=tok.pad_token_id, **kw)


def test_generate_from_cached_embeddings_equals_generation_from_pixels(tiny):
    """Greedy: our KV-cache generate from the cached visual embeddings vs a loop that runs
    transformers' full forward from pixels (re-encoding the video) for every token."""
    model, tok = tiny
    embeds, p3, mask, P, ids, (samples, prompts, pos, _) = batch(model, tok, ((4, 8, 8),))
    toks, _, _ = M.generate(model, embeds, p3, mask, max_new=32, temperature=0, **gen_kwargs(tok))
    seq, seq_pos, nxt, ban = list(prompts[0]), pos[0], int(pos[0].max()) + 1, M.banned_ids(tok)
    with torch.no_grad():
        for j in range(32):
            logits = M.reference_logits(model, torch.tensor([seq]), seq_pos[:, None], samples[0])[0, -1]
            seq.append(int(logits.index_fill(0, ban, float("-inf")).argmax()))
            seq_pos = torch.cat([seq_pos, torch.full((3, 1), nxt + j)], 1)
    assert toks[0].tolist() == seq[len(prompts[0]):]
    assert len(set(seq[len(prompts[0]):])) > 8  # the model's output varies, so equality means something


@pytest.mark.parametrize("temperature,top_p,n,chunk", [(0, 1.0, 1, 7), (1.0, 1.0, 3, 0), (0.7, 0.9, 2, 7)])
def test_kv_cache_generate_equals_recompute(tiny, temperature, top_p, n, chunk):
    """The engine (each prompt prefilled once, in chunks of 7 tokens: boundaries inside the video and
    in the left padding; its KV cache shared by its n samples) against re-running every row whole."""
    model, tok = tiny
    embeds, p3, mask, P, *_ = batch(model, tok, ((4, 8, 8), (2, 4, 6)))  # rows of different lengths
    assert mask[1, 0] == 0 and P > 7 * 4  # row 1 is left-padded; several chunks
    out = []
    for fn, kw in ((M.generate, dict(chunk=chunk)), (M.generate_naive, {})):
        g = [torch.Generator().manual_seed(3 + j) for j in range(2 * n)]  # one a sample, as rollouts
        out.append(fn(model, embeds, p3, mask, n=n, max_new=32, temperature=temperature, top_p=top_p,
                      generator=g, **gen_kwargs(tok), **kw))
    (t1, l1, n1), (t2, l2, n2) = out
    assert torch.equal(t1, t2) and torch.equal(n1, n2) and t1.shape == (2 * n, 32)
    if temperature:
        assert not torch.equal(t1[0], t1[1])  # the n samples of one prompt differ
    # dividing logits by the temperature scales their fp32 rounding differences by 1/temperature
    assert (l1 - l2).abs().max() <= tol(model) / min(1.0, temperature or 1.0)


@gdn_in_float64()
def test_gdn_decode_equals_recompute_in_float64():
    """What `tol` allows Qwen3.5 is the fp32 rounding of its delta rule: with the rule's two forms in
    float64, the engine's sampled tokens and log-probs equal the naive recompute's within the fp32
    log-softmax's rounding."""
    model, tok = M.load("tiny-qwen3.5", dtype=torch.float64)
    embeds, p3, mask, *_ = batch(model, tok, ((4, 8, 8), (2, 4, 6)))
    out = [fn(model, embeds, p3, mask, n=2, max_new=32, temperature=0.7, top_p=0.9, **gen_kwargs(tok), **kw,
              generator=[torch.Generator().manual_seed(3 + j) for j in range(4)])
           for fn, kw in ((M.generate, dict(chunk=7)), (M.generate_naive, {}))]
    assert torch.equal(out[0][0], out[1][0]) and (out[0][1] - out[1][1]).abs().max() <= 2e-6


def test_generate_stops_at_eos_and_pads_after(tiny_a):
    model, tok = tiny_a
    embeds, p3, mask, *_ = batch(model, tok, ((4, 8, 8), (2, 4, 6)))
    free, _, _ = M.generate(model, embeds, p3, mask, max_new=16, temperature=0, **gen_kwargs(tok))
    stop = int(free[0, 5])  # pretend the token row 0 emits 6th is EOS
    kw = gen_kwargs(tok)
    kw["eos_ids"] = [stop]
    toks, lps, n = M.generate(model, embeds, p3, mask, max_new=16, temperature=0, **kw)
    first = free[0].tolist().index(stop)
    assert n[0] == first + 1 and toks[0, first] == stop
    assert (toks[0, first + 1:] == tok.pad_token_id).all() and (lps[0, first + 1:] == 0).all()
    assert torch.equal(toks[0, :first + 1], free[0, :first + 1])


def test_banned_vision_tokens_are_never_sampled(tiny_a):
    """At temperature 50 sampling is near uniform over 512 ids, so 8 vision ids would show up in
    ~1,000 draws; with the ban none may appear."""
    model, tok = tiny_a
    embeds, p3, mask, *_ = batch(model, tok, ((4, 8, 8), (2, 4, 6)))
    ban = M.banned_ids(tok)
    seen = {True: 0, False: 0}
    for banned in (True, False):
        for seed in range(16):
            kw = gen_kwargs(tok, generator=torch.Generator().manual_seed(seed))
            kw["banned"] = ban if banned else None
            toks, _, n = M.generate(model, embeds, p3, mask, max_new=32, temperature=50.0, **kw)
            valid = torch.arange(toks.shape[1]) < n[:, None]
            seen[banned] += int(torch.isin(toks[valid], ban).sum())
    assert seen[True] == 0 and seen[False] > 0


def test_top_p_keeps_smallest_prefix():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(M.sample(logits, 1.0, 0.75, g)[0]) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.75 <= 0.8: the first two
    tok, lp = M.sample(logits, 1.0, 0.4, g)
    assert int(tok) == 0 and abs(float(lp) - torch.log(torch.tensor(0.5))) < 1e-6  # untruncated log-prob


def nucleus(probs, top_p):
    """The top-p reference, apart from M.sample's: probs (V,) renormalized over the smallest set of
    the most likely tokens whose mass reaches top_p."""
    sp, idx = probs.sort(descending=True)
    keep = sp.cumsum(0) - sp < top_p
    q = torch.zeros_like(probs).scatter(0, idx[keep], sp[keep])
    return q / q.sum()


def tv(a, b):
    return 0.5 * float((a.double() - b.double()).abs().sum())


def tv_bound(q, n, delta=1e-6):
    """If n draws follow q (V,), the total variation between their frequencies and q stays under
    this with probability 1 - delta: E[TV] <= 1/2 sum_i sqrt(q_i (1 - q_i) / n) (Jensen, per
    token), and one draw moves TV by at most 1/n, so P(TV >= E[TV] + t) <= exp(-2 n t^2)
    (McDiarmid). A sampler that follows w instead fails it (w.p. 1 - delta) if tv(w, q) exceeds
    tv_bound(q) + tv_bound(w)."""
    q = q.double()
    return float(0.5 * (q * (1 - q) / n).sqrt().sum()) + math.sqrt(math.log(1 / delta) / (2 * n))


def frequencies(toks, V):
    return torch.bincount(toks, minlength=V).double() / len(toks)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampler_draws_from_the_tempered_top_p_distribution(top_p):
    """Every other sampling test compares log-probs, which M.sample computes apart from its draws.
    200,000 draws at temperature 0.7 follow softmax(logits / 0.7), renormalized over its top-p set:
    TV 0.0019 at top-p 1 and 0.0005 at 0.9 (seed 0), under bounds of 0.0074 and 0.0069 (false
    failure 1e-6). The logits put each planted bug 10-18x the bound away: untempered draws (TV
    0.086; at top-p 0.9, 0.125), the top-p set of the untempered distribution (0.073: 3 tokens, not
    2), top-p ignored (0.078)."""
    logits, T, n = torch.tensor([3.0, 2.5, 1.5, -0.5, -1.5, -2.0]), 0.7, 200_000
    tempered, untempered = (logits / T).softmax(0), logits.softmax(0)
    q, wrong = nucleus(tempered, top_p), [nucleus(untempered, top_p)]
    if top_p < 1:  # the untempered top-p set; top-p ignored
        wrong += [nucleus(tempered * (nucleus(untempered, top_p) > 0), 1.0), tempered]
    assert all(tv(w, q) > tv_bound(q, n) + tv_bound(w, n) for w in wrong)  # the test's power
    tok, _ = M.sample(logits.expand(n, -1), T, top_p, torch.Generator().manual_seed(0))
    assert tv(frequencies(tok, len(q)), q) <= tv_bound(q, n)


def test_decode_draws_from_the_tempered_top_p_distribution(tiny_a):
    """The same through decode (the first token of 10,000 samples of one prompt, a generator per
    prompt), on the tiny model's logits: at 0.7 and top-p 0.9, TV 0.039 over its 142 tokens (seed
    0) under the bound 0.076; untempered draws are 0.23 away, and without top-p, or with the
    untempered top-p set, 10% or 7% of the draws would fall outside the set, where none may."""
    model, tok = tiny_a
    embeds, p3, mask, *_ = batch(model, tok, ((2, 4, 6),))
    T, top_p, n = 0.7, 0.9, 10_000
    with torch.no_grad():
        cache, h = M.prefill(model, embeds, p3, mask)
        logits = M._next_logits(model, h, M.banned_ids(tok))[0]
    q, untempered = nucleus((logits / T).softmax(0), top_p), nucleus(logits.softmax(0), top_p)
    assert tv(untempered, q) > tv_bound(q, n) + tv_bound(untempered, n)  # the test's power
    toks, _, _ = M.decode(model, cache, mask, h, p3.amax(dim=(0, 2)) + 1, n=n, max_new=1, temperature=T,
                          top_p=top_p, generator=[torch.Generator().manual_seed(0)], **gen_kwargs(tok))
    f = frequencies(toks[:, 0], len(q))
    assert f[q == 0].sum() == 0 and tv(f, q) <= tv_bound(q, n)


def test_chunked_logprobs_equal_full_logits_with_gradients(tiny_a):
    model, tok = tiny_a
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, model.config.text_config.hidden_size, requires_grad=True)
    y = torch.randint(0, len(tok), (2, 7))
    ban = M.banned_ids(tok)
    lp, ent = M.token_logprobs(model, hidden, y, temperature=0.8, banned=ban, chunk=3)
    logits = (model.lm_head(hidden) / 0.8).index_fill(-1, ban, float("-inf"))
    ref = logits.log_softmax(-1)
    ref_lp = ref.gather(-1, y[..., None])[..., 0]
    ref_ent = -(ref.exp() * ref.nan_to_num(neginf=0)).sum(-1)
    assert (lp - ref_lp).abs().max() <= 1e-5 and (ent - ref_ent).abs().max() <= 1e-5
    g1 = torch.autograd.grad((lp * 0.3 + ent).sum(), [hidden, model.lm_head.weight])
    g2 = torch.autograd.grad((ref_lp * 0.3 + ref_ent).sum(), [hidden, model.lm_head.weight])
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(g1, g2))


def test_trainer_logprobs_equal_rollout_logprobs(tiny):
    """The training forward over [prompt | response] scores the sampled tokens exactly as the
    rollout reported them: same positions, same masking, same distribution."""
    model, tok = tiny
    embeds, p3, mask, P, *_ = batch(model, tok, ((4, 8, 8), (2, 4, 6)))
    toks, lps, n = M.generate(model, embeds, p3, mask, max_new=24, temperature=1.0,
                              generator=torch.Generator().manual_seed(0), **gen_kwargs(tok))
    responses = [toks[b, :n[b]].tolist() for b in range(len(n))]
    embeds2, p32, mask2, P2, ids2, _ = batch(model, tok, ((4, 8, 8), (2, 4, 6)), responses)
    with torch.no_grad():
        lp, _ = M.response_logprobs(model, embeds2, p32, mask2, P2, ids2[:, P2:], banned=M.banned_ids(tok))
    valid = mask2[:, P2:].bool()
    assert (lp - lps[:, :lp.shape[1]])[valid].abs().max() <= tol(model)


def test_padding_never_changes_a_rows_logprobs(tiny_a):
    model, tok = tiny_a
    resp = [[105, 106, 107, 108], [109, 110]]
    _, prompts, pos, visual = video_inputs(model, tok, ((4, 8, 8), (2, 4, 6)))
    ids, p3, mask, P = M.layout(prompts, pos, resp, pad_id=tok.pad_token_id)
    ids1, p31, mask1, P1 = M.layout(prompts[1:], pos[1:], resp[1:], pad_id=tok.pad_token_id)
    assert mask[1].sum() < mask.shape[1] and mask1.all()  # padded in the batch, not alone
    with torch.no_grad():
        both, _ = M.response_logprobs(model, M.splice(model, ids, torch.cat(visual)), p3, mask, P, ids[:, P:])
        alone, _ = M.response_logprobs(model, M.splice(model, ids1, visual[1]), p31, mask1, P1, ids1[:, P1:])
    assert (both[1, :2] - alone[0]).abs().max() <= 1e-5


def test_bf16_runs_close_to_fp32():
    model, tok = M.load("tiny", dtype=torch.bfloat16)
    model32, _ = M.load("tiny")
    outs = []
    for m in (model, model32):
        e, p, mask, P, ids, _ = batch(m, tok, ((2, 8, 8),), [[105, 106, 107]])
        with torch.no_grad():
            outs.append(M.response_logprobs(m, e, p, mask, P, ids[:, P:])[0])
    assert outs[0].dtype == torch.float32 and (outs[0] - outs[1]).abs().max() < 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_check_command_prints_json(family, tmp_path):
    """`model.py check` on a saved folder of each family (as a user runs it on a checkpoint)."""
    M.save(*M.load(family), str(tmp_path))
    out = subprocess.run([sys.executable, "model.py", "check", "--hf", str(tmp_path)], capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0 and res["family"] == family[5:].replace(".", "_").replace("-", "_")
    diffs = [v for k, v in res.items() if k.endswith("max_abs_diff")]
    assert len(diffs) == 4 and max(diffs) <= 1e-5, res


def test_check_command_names_a_missing_folder():
    bad = subprocess.run([sys.executable, "model.py", "check", "--hf", "/nonexistent"], capture_output=True, text=True)
    assert bad.returncode == 1 and "no config.json" in bad.stderr


def test_per_prompt_generators_make_samples_independent_of_batching(tiny_a):
    """With one generator per prompt, what a prompt samples is the same alone or beside others (so
    rollouts do not depend on how prompts are split over ranks)."""
    model, tok = tiny_a
    _, prompts, pos, visual = video_inputs(model, tok, ((4, 8, 8), (2, 4, 6)))
    ids, p3, mask, _ = M.layout(prompts, pos, pad_id=tok.pad_token_id)
    ids1, p31, mask1, _ = M.layout(prompts[1:], pos[1:], pad_id=tok.pad_token_id)
    kw = dict(n=3, max_new=16, temperature=1.0, **gen_kwargs(tok))
    both, _, n_both = M.generate(model, M.splice(model, ids, torch.cat(visual)), p3, mask,
                                 generator=[torch.Generator().manual_seed(s) for s in (7, 8)], **kw)
    alone, _, n_alone = M.generate(model, M.splice(model, ids1, visual[1]), p31, mask1,
                                   generator=[torch.Generator().manual_seed(8)], **kw)
    assert torch.equal(both[3:, :alone.shape[1]], alone) and torch.equal(n_both[3:], n_alone)


@pytest.mark.parametrize("name", [n for n in M.TINY if n.startswith("tiny:")])
def test_miniature_has_its_real_models_structure(name):
    """Each miniature of a real checkpoint (mr_sp.REAL, the planner's) has its query and KV heads,
    Gated DeltaNet heads and layer pattern (Qwen3.5),
    tied or untied embeddings, patch layout, window and full-attention vision blocks (the last one
    full), DeepStack taps; and our path equals transformers' forward from pixels on it."""
    import mr_sp
    mini, real = mr_sp.plan_config(name), mr_sp.plan_config(name.split(":")[1])
    t, rt = mini.get_text_config(), real.get_text_config()
    assert (t.num_attention_heads, t.num_key_value_heads) == (rt.num_attention_heads, rt.num_key_value_heads)
    assert M.recurrent(mini) == M.recurrent(real)
    if M.recurrent(real):  # Qwen3.5: its Gated DeltaNet heads, and attention every 4th layer
        gdn = ("linear_num_key_heads", "linear_num_value_heads")
        assert [getattr(t, k) for k in gdn] == [getattr(rt, k) for k in gdn]
        assert t.layer_types == rt.layer_types[:len(t.layer_types)] and "full_attention" in t.layer_types
    assert (mini.model_type, mini.tie_word_embeddings) == (real.model_type, real.tie_word_embeddings)
    v, rv = mini.vision_config, real.vision_config
    for key in ("patch_size", "spatial_merge_size", "temporal_patch_size"):
        assert getattr(v, key) == getattr(rv, key), key
    full = getattr(rv, "fullatt_block_indexes", None)
    if full:  # both kinds of block, the last one full attention
        assert 0 < len(v.fullatt_block_indexes) < v.depth and v.fullatt_block_indexes[-1] == v.depth - 1
        assert full[-1] == rv.depth - 1 and v.window_size == rv.window_size
    assert len(getattr(v, "deepstack_visual_indexes", ())) == len(getattr(rv, "deepstack_visual_indexes", ()))
    diffs = {k: x for k, x in M.check(name).items() if k.endswith("diff")}
    assert len(diffs) == 4 and max(diffs.values()) <= 1e-5, diffs


class NewTensors(TorchDispatchMode):
    """Inside it (`with`, any number of times), of the tensors ops make: `most`, the most elements of
    one, by dtype; `second`, the largest second-longest dimension of one (an (L, L) mask or score
    tensor has two dimensions of L; activations, one)."""

    def __init__(self):
        super().__init__()
        self.most, self.second = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_leaves(out):
            if isinstance(x, torch.Tensor):
                self.most[x.dtype] = max(self.most.get(x.dtype, 0), x.numel())
                self.second = max(self.second, sorted(x.shape, reverse=True)[1] if x.dim() > 1 else 0)
        return out


def test_decode_reads_the_prompt_cache_in_its_dtype():
    """A bf16 decode step over a prompt's cache makes no fp32 tensor as large as the prompt's values
    (an fp32 copy of V in every layer at every step is GBs of extra memory traffic a token at 7B)."""
    model, tok = M.load("tiny", dtype=torch.bfloat16)
    samples, prompts, pos, visual = video_inputs(model, tok, [(16, 16, 16)])
    ids, pos, mask, _ = M.layout(prompts, pos)
    cache, h = M.prefill(model, M.splice(model, ids, visual[0]), pos, mask)
    t = model.config.get_text_config()
    values = t.num_key_value_heads * ids.shape[1] * t.hidden_size // t.num_attention_heads
    with NewTensors() as new:
        toks = M.decode(model, cache, mask, h, pos.amax(dim=(0, 2)) + 1, 2, max_new=3, temperature=0.7)[0]
    assert toks.shape == (2, 3) and new.most[torch.float32] < values, (new.most, values)


# -----------------------------------------------------------------------------
# Qwen2.5-Omni's thinker: audio alone, a video with its own sound (TMRoPE), its folders

@pytest.fixture(scope="module")
def omni():
    return M.load("tiny-qwen2.5-omni")


def omni_ids(cfg):
    return (cfg.video_token_id, cfg.audio_token_id, cfg.vision_start_token_id, cfg.audio_start_token_id,
            cfg.audio_end_token_id, cfg.vision_end_token_id)


def test_omni_positions_hand_computed(omni):
    """TMRoPE written out by hand, at the released 25 positions a second and chunks of 2 s: two text
    tokens, then a video of 2 temporal groups of 1x2 merged tokens at 2 s a group (temporal 0 and
    50) with 3 tokens of its own sound. Layout: video chunk 0 (2 tokens), audio chunk 0 (all 3),
    video chunk 1. <|vision_bos|><|audio_bos|> share position 2; video and audio both start at 3,
    audio one position a token in all three; <|audio_eos|><|vision_eos|> share max + 1 = 54."""
    model, tok = omni
    cfg, t = model.config, 11
    V, A, vb, ab, ae, ve = omni_ids(cfg)
    ids = [t, t, vb, ab, V, V, A, A, A, V, V, ae, ve, t]
    built = M.build_prompt(tok, cfg, "Why?", "video", [[2, 2, 4]], second_per_grid=2.0, audio=3)
    assert built[built.index(vb):built.index(ve) + 1] == ids[2:13]
    assert M.positions(ids, [[2, 2, 4]], [2.0], cfg).T.tolist() == [
        [0, 0, 0], [1, 1, 1], [2, 2, 2], [2, 2, 2],  # text, the bos pair
        [3, 3, 3], [3, 3, 4], [3, 3, 3], [4, 4, 4], [5, 5, 5], [53, 3, 3], [53, 3, 4],  # V V A A A V V
        [54, 54, 54], [54, 54, 54], [55, 55, 55]]  # the eos pair, text
    # audio alone is text to TMRoPE: <|audio_bos|> A A A <|audio_eos|>, one position a token
    assert M.positions([t, ab, A, A, A, ae, t], [], [], cfg).T.tolist() == [[k] * 3 for k in range(7)]


def test_omni_layout_of_a_group_longer_than_a_chunk(omni):
    """At 4 s a temporal group (0.5 fps, as long videos are sampled) a group's temporal position leaps
    two chunks of 2 s. Qwen2.5-Omni's rule (`chunk_bounds`; transformers' processor and get_rope_index)
    opens one chunk per token: video temporal positions 0, 0, 100, 100 chunk as [0, 0], [100], [100],
    so 60 audio tokens (2.4 s) interleave as V2 A50 V1 A10 V1, not V2 A50 V2 A10 (chunks by time)."""
    model, tok = omni
    cfg = model.config
    V, A, vb, ab, ae, ve = omni_ids(cfg)
    assert M.chunk_bounds([0, 0, 100, 100], 50) == [(0, 2), (2, 3), (3, 4)]
    ids = M.build_prompt(tok, cfg, "Why?", "video", [[2, 2, 4]], second_per_grid=4.0, audio=60)
    a, b = ids.index(vb), ids.index(ve) + 1
    assert ids[a:b] == [vb, ab] + [V] * 2 + [A] * 50 + [V] + [A] * 10 + [V] + [ae, ve]
    s = a + 1  # video and audio start after the bos pair (text before it: one position a token)
    expect = ([[s, s, s], [s, s, s + 1]] + [[s + k] * 3 for k in range(50)] + [[s + 100, s, s]]
              + [[s + k] * 3 for k in range(50, 60)] + [[s + 100, s, s + 1]] + [[s + 101] * 3] * 2)
    assert M.positions(ids, [[2, 2, 4]], [4.0], cfg)[:, a + 2:b].T.tolist() == expect


def test_omni_temporal_index_in_transformers_arithmetic(omni):
    """get_rope_index forms i * second_per_grid * 25 in float32: at 2/3 s a group (3 fps) group 3 is
    at 50, in the second chunk; float64 (our Qwen2.5-VL rule's, and vLLM's) gives 49, in the first."""
    cfg = omni[0].config
    assert M.temporal(cfg, 4, 2 / 3).tolist() == [0, 16, 33, 50] and int(3 * (2 / 3 * 25)) == 49


@pytest.mark.parametrize("kind,spg,seconds", [
    (None, None, 0), ("image", None, 0), ("video", 2 / 3, 0), ("audio", None, 3.1),
    ("audio+image", None, 3.1), ("video", 2.0, 3.1), ("video", 4.0, 7.3), ("video", 2 / 3, 4.0),
    ("video", 31 / 14, 1.0), ("video", 1.0, 12.0)])
def test_omni_positions_equal_get_rope_index(omni, kind, spg, seconds):
    """Our prompt layout and positions vs transformers' get_rope_index (use_audio_in_video for a video
    with sound; the original rule: text after a video at max + 1): text, an image, a video, audio
    alone (beside an image too: get_rope_index's own audio branch), and videos with their sound at
    3, 1, 0.5, 0.45 fps (a group in one chunk, leaping two, float32's 50 at 3 fps), sound shorter
    and longer than the video."""
    model, tok = omni
    cfg, frames = model.config, round(100 * seconds)
    n = int(audio_tokens(frames)) if seconds else 0
    grid = [[4, 4, 6]] if kind == "video" else [[1, 4, 6]]
    if kind == "audio+image":  # an audio turn, then an image turn
        ids = M.build_prompt(tok, cfg, "Hear.", "audio", audio=n)
        ids += M.build_prompt(tok, cfg, "See.", "image", grid)
    else:
        ids = M.build_prompt(tok, cfg, "Why?", kind, grid, second_per_grid=spg, audio=n)
    vision = kind in ("video", "image", "audio+image")
    ours = M.positions(ids, grid if vision else [], [spg or 1.0], cfg)
    ids_t = torch.tensor([ids])
    kw = {f"{'video' if kind == 'video' else 'image'}_grid_thw": torch.tensor(grid)} if vision else {}
    theirs, _ = model.get_rope_index(ids_t, attention_mask=torch.ones_like(ids_t), **kw,
                                     use_audio_in_video=kind == "video" and n > 0, audio_seqlens=torch.tensor([frames]),
                                     second_per_grids=torch.tensor([spg or 1.0]))
    assert torch.equal(ours, theirs[:, 0])
    assert (ids_t == cfg.audio_token_id).sum() == n


def test_omni_check_equals_transformers():
    """`model.py check --hf tiny-qwen2.5-omni`: our path vs the thinker's own forward from pixels and
    log-mels at its own positions: a video, a video with its sound (4 chunks; a group leaping two),
    audio alone, an image, text."""
    out = M.check("tiny-qwen2.5-omni")
    diffs = {k: v for k, v in out.items() if k.endswith("max_abs_diff")}
    kinds = ("visual_embeds", "audio_embeds", "logits_video", "logits_video_audio", "logits_audio",
             "logits_image", "logits_text")
    assert sorted(diffs) == sorted(f"{k}_max_abs_diff" for k in kinds)
    assert max(diffs.values()) <= 1e-5, diffs


def test_omni_encode_mels_of_padded_clips_equals_each_alone(omni):
    """Clips of 3.1 s and 1.3 s in one batch, the shorter padded with garbage its mask drops: the
    same embeddings as each encoded alone, in order (the tower's 2 s windows are per clip), up to
    fp32 rounding of other batch shapes (3e-6 seen)."""
    model = omni[0]
    a, b = M.random_audio(3.1, seed=1), M.random_audio(1.3, seed=2)
    feats = torch.randn(2, 128, 310)
    feats[0], feats[1, :, :130] = a["input_features"][0], b["input_features"][0]
    mask = (torch.arange(310) < torch.tensor([[310], [130]])).long()
    with torch.no_grad():
        both = M.encode_mels(model, feats, mask)
        alone = [M.encode_mels(model, x["input_features"], x["feature_attention_mask"]) for x in (a, b)]
    assert both.shape == (77 + 32, model.config.text_config.hidden_size)
    assert (both - torch.cat(alone)).abs().max() <= 1e-5


def test_omni_splice_rejects_audio_count_mismatch(omni):
    model, tok = omni
    ids = torch.tensor([M.build_prompt(tok, model.config, "?", "audio", audio=5)])
    with pytest.raises(ValueError, match="5 audio pad tokens but 4 audio embeddings"):
        M.splice(model, ids, None, torch.zeros(4, model.config.text_config.hidden_size))


def own_thinker_config(tok):
    """A Qwen2.5-Omni thinker config written here, not by tiny_config: untied, 4 query heads over 2 KV
    heads, vision windows of 56 pixels, audio attention windows of 1 s (n_window 50) and time chunks
    of 1 s, so that nothing can lean on tiny_config's values or the release's. init 0.1, as tiny's:
    the library's 0.02 makes near-constant logits, which a wrong position barely moves."""
    from transformers import Qwen2_5OmniThinkerConfig
    ids = {s: tok.convert_tokens_to_ids(s) for s in M.OMNI_SPECIAL}
    return Qwen2_5OmniThinkerConfig(
        audio_config=dict(d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=96,
                          output_dim=128, n_window=50, initializer_range=0.1),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=96, num_heads=2, out_hidden_size=128,
                           window_size=56, fullatt_block_indexes=[1], initializer_range=0.1),
        text_config=dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[4, 6, 6])),
        audio_token_id=ids["<|AUDIO|>"], audio_start_token_id=ids["<|audio_bos|>"],
        audio_end_token_id=ids["<|audio_eos|>"], image_token_id=ids["<|IMAGE|>"], video_token_id=ids["<|VIDEO|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
        seconds_per_chunk=1, tie_word_embeddings=False, initializer_range=0.1)


@pytest.fixture(scope="module")
def omni_folders(tmp_path_factory):
    """Folders transformers writes from own_thinker_config: a thinker alone, and a whole Qwen2.5-Omni
    (thinker, talker, token2wav, the thinker's weights under thinker.*), with the tiny Omni tokenizer.
    Returns their paths and the whole model's thinker."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration as Thinker
    tok, root = M.tiny_tokenizer(omni=True), tmp_path_factory.mktemp("omni")
    torch.manual_seed(0)
    Thinker(own_thinker_config(tok)).save_pretrained(root / "thinker")
    talker = dict(vocab_size=64, embedding_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                  rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]))
    talker.update({f"tts_{k}_token_id": i for i, k in enumerate(
        ("text_start", "text_end", "text_pad", "codec_start", "codec_end", "codec_pad", "codec_mask"))})
    token2wav = dict(
        dit_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, emb_dim=16,
                        enc_emb_dim=16, enc_dim=16, enc_channels=[16, 16, 16, 16, 48], enc_attention_channels=8,
                        enc_se_channels=8, num_embeds=64, look_ahead_layers=[1], look_backward_layers=[0]),
        bigvgan_config=dict(upsample_initial_channel=32, resblock_kernel_sizes=[3], upsample_rates=[2],
                            resblock_dilation_sizes=[[1, 3, 5]], upsample_kernel_sizes=[4]))
    whole = Qwen2_5OmniForConditionalGeneration(Qwen2_5OmniConfig(
        thinker_config=own_thinker_config(tok).to_dict(), talker_config=talker, token2wav_config=token2wav))
    whole.save_pretrained(root / "whole")
    for d in ("thinker", "whole"):
        tok.save_pretrained(root / d)
    return root / "thinker", root / "whole", whole.thinker


def test_check_command_on_a_thinker_folder_written_by_transformers(omni_folders):
    out = subprocess.run([sys.executable, "model.py", "check", "--hf", str(omni_folders[0])],
                         capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    diffs = {k: v for k, v in res.items() if k.endswith("max_abs_diff")}
    assert out.returncode == 0 and res["family"] == "qwen2_5_omni_thinker" and len(diffs) == 7, res
    assert max(diffs.values()) <= 1e-5, res


def test_load_takes_the_thinker_of_a_whole_omni_folder(omni_folders):
    """A whole Qwen2.5-Omni folder loads as its thinker, every weight the whole model's thinker's
    (stored under thinker.*; the talker's and token2wav's left), and passes the check."""
    _, whole, thinker = omni_folders
    model, _ = M.load(str(whole))
    assert type(model) is type(thinker) and not model.config.tie_word_embeddings
    ours, theirs = model.state_dict(), thinker.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    diffs = {k: v for k, v in M.check(str(whole)).items() if k.endswith("max_abs_diff")}
    assert len(diffs) == 7 and max(diffs.values()) <= 1e-5, diffs


def test_omni_saved_folder_loads_back_and_in_transformers(omni, tmp_path):
    """Our saved thinker folder: transformers loads it (AutoModelForImageTextToText) with the same
    logits on a video with its sound at its own positions; load reads back the same weights, the
    tokenizer the same prompts; the feature extractor config is the release's."""
    model, tok = omni
    M.save(model, tok, str(tmp_path / "ckpt"))
    from transformers import AutoFeatureExtractor, AutoModelForImageTextToText
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "ckpt").eval()
    assert type(loaded) is type(model)
    s = dict(M.random_samples(model, ((2, 8, 8),))[0], **M.random_audio(2.5))
    ids = torch.tensor([M.prompt_of(tok, model.config, s, "What do you hear?")[0]])
    with torch.no_grad():
        assert torch.equal(M.reference_logits(model, ids, None, s), M.reference_logits(loaded, ids, None, s))
    model2, tok2 = M.load(str(tmp_path / "ckpt"))
    assert model2.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert M.prompt_of(tok2, model2.config, s, "?")[0] == M.prompt_of(tok, model.config, s, "?")[0]
    fe = AutoFeatureExtractor.from_pretrained(tmp_path / "ckpt")
    assert (type(fe).__name__, fe.feature_size, fe.sampling_rate, fe.hop_length, fe.n_fft) == (
        "WhisperFeatureExtractor", 128, 16000, 160, 400)


def test_omni_kv_cache_generate_equals_recompute(omni):
    """The engine on videos with their sound (rows of different lengths, left padding): each prompt
    prefilled once in chunks of 7, its samples sharing the cache, vs re-running every row whole."""
    model, tok = omni
    samples = [dict(s, **M.random_audio(sec, seed=i)) for i, (s, sec) in
               enumerate(zip(M.random_samples(model, ((4, 8, 8), (2, 4, 6))), (3.1, 1.3)))]
    prompts, pos = zip(*[M.prompt_of(tok, model.config, s, "What happens?") for s in samples])
    ids, p3, mask, _ = M.layout(prompts, pos, pad_id=tok.pad_token_id)
    with torch.no_grad():
        vis = torch.cat([M.encode_pixels(model, s["pixel_values"], s["grid_thw"]) for s in samples])
        aud = torch.cat([M.encode_mels(model, s["input_features"], s["feature_attention_mask"])
                         for s in samples])
    embeds = M.splice(model, ids, vis, aud)
    assert mask[1, 0] == 0
    out = [fn(model, embeds, p3, mask, n=2, max_new=24, temperature=1.0, **gen_kwargs(tok), **kw,
              generator=[torch.Generator().manual_seed(j) for j in range(4)])
           for fn, kw in ((M.generate, dict(chunk=7)), (M.generate_naive, {}))]
    assert torch.equal(out[0][0], out[1][0]) and (out[0][1] - out[1][1]).abs().max() <= 1e-5
    assert not torch.equal(out[0][0][0], out[0][0][1])  # a prompt's 2 samples differ: the draws vary
    assert not torch.isin(out[0][0], M.banned_ids(tok)).any() and len(M.banned_ids(tok)) == 8
