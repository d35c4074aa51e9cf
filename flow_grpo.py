"""Flow-GRPO: RL for flow-matching image (SD3-style MMDiT) and video (Wan) generators on pixels.

    python flow_grpo.py                                # tiny SD3 built in code, built-in prompts
    torchrun --nproc_per_node 2 flow_grpo.py           # the same, data parallel
    python flow_grpo.py --init tiny-wan                # a tiny Wan video model, 5 frames
    torchrun --nproc_per_node 2 flow_grpo.py --init tiny-wan --sp 2  # Ulysses over its tokens
    torchrun --nproc_per_node 2 flow_grpo.py --fsdp    # the transformer sharded (FSDP2)
    python flow_grpo.py --init /path/to/stable-diffusion-3.5-medium --data prompts.txt --reward m:f

Writes --out (default runs/flow_grpo): model/ (the pipeline as a diffusers folder, with state.pt:
optimizer, step, data cursor, the first evaluation, for --resume), args.json, metrics.jsonl (per
step) and grid.png (held-out samples: the first row before training, the second after).
The variant that runs, exactly (Flow-GRPO, Liu et al., arXiv 2505.05470; code: yifan123/flow_grpo):
1. Each step takes --prompts prompts (contiguous blocks over data-parallel ranks); the frozen text
   encoders embed each once for its G samples and every pass (as mr_sp.py does a video).
2. G samples per prompt by the SDE sampler of Flow-GRPO's ODE-to-SDE conversion (its update rule),
   Euler-Maruyama over --denoise steps of the scheduler's sigmas s_0 = 1 > ... > s_n = 0 (x at
   s: (1 - s) data + s noise, v the predicted velocity, dt = s' - s < 0):
     x' = x + [v + std^2 / (2 s) (x + (1 - s) v)] dt + std sqrt(-dt) eps,  std = a sqrt(s / (1 - s))
   with a = --noise-level (the paper's and its code's; at s = 1, 1 - s is 1 - s_1, as its code
   does). At a = 0 this is diffusers' Euler step x + v dt (tests check both). Each step is a
   Gaussian, and its log-prob is the mean over latent elements of log N(x'; mean, std^2 (-dt))
   (a mean, not a sum, as the code's: the per-step ratio stays near 1). Sample j of a prompt draws
   its noise from seed (seed, step, prompt id, j): the same samples on any number of ranks.
   --cfg w > 1: classifier-free guidance v = v(empty) + w (v(prompt) - v(empty)), in the policy too.
3. Reward on the decoded pixels, r = f(image (3, H, W) or video (3, F, H, W) in [0, 1], row)
   (--reward module:function; default colour_side: how much brighter the named colour is on the
   named side, over all frames). A reward that raises or is not finite costs its prompt's group this
   step (reward_errors).
4. Advantage of every step of a sample: its prompt's G rewards, (r - mean) / (std + 1e-6) with
   unbiased std (grpo.group_advantages; Flow-GRPO's code: the biased std), clipped to +-5
   (--adv-clip, its adv_clip_max).
5. Denoising reduction: rollouts use --denoise steps (Flow-GRPO: 10), evaluation --eval-denoise
   (ODE, a = 0); each sample trains on --train-steps of its steps drawn at random (0: all; its
   timestep_fraction).
6. Loss per (sample, step): grpo.policy_loss's clip, r = exp(logp - old), old the sampler's own
   log-prob (equal to the trainer's before any update: checked every step, logprob_gap), clipped at
   1 +- --clip (Flow-GRPO: 1e-4, as the ratio is of per-element means); no dual clip. Plus
   --kl-coef x KL to the frozen initial transformer, per step the Gaussians' closed form
   ||mean - mean_ref||^2 / (2 std^2 (-dt)), mean over elements (Flow-GRPO's). Aggregated as
   grpo.aggregate's token mean over all (sample, step) pairs of the global mini-batch.
7. --epochs passes over the rollouts in --mini-batches AdamW updates each (grpo.mini_batches:
   micro-batches of one prompt's samples), gradients summed over ranks (mr_sp.sync_grads), clipped.
   The transformer alone trains (full weights; Flow-GRPO trains LoRA on SD3.5); text encoders and
   VAE are frozen.
8. Video (Wan) with --sp N: Ulysses over the transformer's latent frames x height x width tokens
   (`use_ulysses`): each rank of an SP group runs its block of the tokens through every layer, the
   self-attention trades it for a share of the heads over all tokens (mr_sp.py's all-to-all), the
   output is gathered; SP peers sample and train the same prompts. sp 2 equals one process (tests).
9. --fsdp: the trained transformer sharded over all ranks (mr_sp.shard, its blocks the units; with
   --sp too); rollouts and evaluation run on its gathered weights (mr_sp.unsharded), a checkpoint
   holds the whole state (gathered to rank 0). The KL reference stays replicated.
Not yet: LoRA, Ulysses for SD3's joint attention, a sharded KL reference."""
import argparse
import copy
import functools
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import grpo
import model as M
import mr_sp

# -----------------------------------------------------------------------------
ap = argparse.ArgumentParser(description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
g = ap.add_argument_group("model and data")
g.add_argument("--init", default="tiny-sd3", help="tiny-sd3 or tiny-wan (built in code), or a "
               "diffusers SD3 or Wan folder; default tiny-sd3")
g.add_argument("--data", default=None, help="training prompts: .jsonl rows with a prompt field, or "
               ".txt, a prompt a line; default: the built-in prompts (red on the left)")
g.add_argument("--eval-data", default=None, help="held-out prompts, same formats; default built-in")
g.add_argument("--resolution", type=int, default=32,
               help="image (or video frame) side, pixels; default 32")
g.add_argument("--frames", type=int, default=5, help="video frames (Wan), 1 + a multiple of its "
               "VAE's temporal factor (tiny-wan: 2); default 5")
g.add_argument("--text-len", type=int, default=8,
               help="T5 tokens of a prompt (SD3's max_sequence_length); default 8")
g = ap.add_argument_group("sampling")
g.add_argument("--G", type=int, default=8, help="samples per prompt; default 8")
g.add_argument("--prompts", type=int, default=4, help="prompts per step over all ranks; default 4")
g.add_argument("--denoise", type=int, default=10, help="denoising steps of a rollout; default 10")
g.add_argument("--eval-denoise", type=int, default=20,
               help="denoising steps of evaluation samples (ODE); default 20")
g.add_argument("--noise-level", type=float, default=0.7,
               help="SDE noise a (docstring item 2; 0 = the ODE); default 0.7")
g.add_argument("--eval-samples", type=int, default=4,
               help="ODE samples of each held-out prompt (its own seeds); default 4")
g.add_argument("--cfg", type=float, default=1.0,
               help="classifier-free guidance scale (1 = off, one pass); default 1")
g = ap.add_argument_group("algorithm")
g.add_argument("--reward", default=None, help="module:function(image, row) -> float or dict with "
               "overall; default colour_side")
g.add_argument("--train-steps", type=int, default=0,
               help="denoising steps a sample trains on, drawn at random (0 = all); default 0")
g.add_argument("--clip", type=float, default=1e-4, help="ratio clip 1 +- this; default 1e-4")
g.add_argument("--adv-clip", type=float, default=5.0,
               help="advantages clipped to +-this; default 5")
g.add_argument("--kl-coef", type=float, default=0.0,
               help="KL weight (0 = no reference model); default 0")
g.add_argument("--epochs", type=int, default=1, help="passes over each rollout batch; default 1")
g.add_argument("--mini-batches", type=int, default=1, help="optimizer updates per pass; default 1")
g.add_argument("--micro-batch", type=int, default=8, help="samples per forward/backward; default 8")
g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate; default 1e-3")
g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay; default 1e-4")
g.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm; default 1.0")
g = ap.add_argument_group("run")
g.add_argument("--steps", type=int, default=400, help="training steps; default 400")
g.add_argument("--seed", type=int, default=0, help="seed for data order, noise, the tiny model")
g.add_argument("--out", default="runs/flow_grpo", help="output folder; default runs/flow_grpo")
g.add_argument("--save-every", type=int, default=20, help="checkpoint every N steps (0 = end only)")
g.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
g.add_argument("--sp", type=int, default=1, help="sequence-parallel degree: ranks per SP group, "
               "which split each sequence; world = dp x sp; default 1")
g.add_argument("--fsdp", action="store_true", help="shard the trained weights, their gradients and "
               "AdamW state over all ranks (FSDP2), not replicate: the same updates; no-op in one process")
# -----------------------------------------------------------------------------


def tiny_sd3(seed=0, resolution=32):
    """A random StableDiffusion3Pipeline small enough for a CPU test: a 2-block MMDiT (80K
    parameters), a 2-level VAE (latent 4 x res/2 x res/2) and two 2-layer CLIP text encoders over a
    byte-level tokenizer with no merges (one token a character), built offline. SD3's third
    encoder (T5) is absent, which its pipeline allows: zeros stand in for its tokens."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
    torch.manual_seed(seed)
    chars = sorted(ByteLevel.alphabet())
    special = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + special)}
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=24)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=24,
                         projection_dim=32, bos_token_id=vocab[special[0]],
                         eos_token_id=vocab[special[1]], pad_token_id=vocab[special[1]])
    # joint width 64: the two encoders' 32 each, concatenated (SD3 pads them to T5's width)
    transformer = SD3Transformer2DModel(
        sample_size=resolution // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=resolution // 2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, block_out_channels=(8, 16),
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                        sample_size=resolution, scaling_factor=1.0, shift_factor=0.0)
    encoders = [CLIPTextModelWithProjection(cfg) for _ in range(2)]
    for te in encoders:  # SD3 reads the penultimate layer, not normalized: at CLIP's init (std
        # 0.02) the text moves the velocity by 1%; at 1, as trained encoders' hidden states are, 10%
        emb = te.text_model.embeddings
        torch.nn.init.normal_(emb.token_embedding.weight)
        torch.nn.init.normal_(emb.position_embedding.weight)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=tok, text_encoder_2=encoders[1], tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None)


def tiny_wan(seed=0):
    """A random WanPipeline small enough for a CPU test: a 2-block Wan transformer (4 heads of 12,
    81K parameters), a Wan VAE with one 2x down step in space and time (latent 4 x (F + 1)/2 x res/2
    x res/2) and a 2-layer UMT5 encoder over a word-piece tokenizer built offline: the built-in
    prompts' words whole (so 8 tokens hold a prompt, as SD3's T5 length), other words by letters."""
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline,
                           WanTransformer3DModel)
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel
    torch.manual_seed(seed)
    words = sorted({w for s in THINGS for r in builtin_prompts(s) for w in r["prompt"].split()}
                   | set(COLOURS) | set(SIDES))
    letters = [chr(c) for c in range(33, 127)]
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + words + letters
                                        + ["##" + c for c in letters])}
    t = Tokenizer(WordPiece(vocab, unk_token="<unk>"))
    t.normalizer, t.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="</s>",
                                  unk_token="<unk>")
    cfg = UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                     num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=4,
        out_channels=4, text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2, rope_max_seq_len=64)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[True], latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4, scale_factor_temporal=2, scale_factor_spatial=2)
    return WanPipeline(tokenizer=tok, text_encoder=UMT5EncoderModel(cfg), vae=vae,
                       transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))  # Wan 2.1 480p's


def is_video(pipe):
    return hasattr(pipe, "vae_scale_factor_temporal")


def load(path, device="cpu", seed=0, resolution=32):
    """The pipeline from a diffusers folder (SD3 / SD3.5 or Wan 2.1 layout, by its model_index.json;
    components it lists as absent passed as None, as our tiny SD3's T5), tiny-sd3 or tiny-wan; fp32,
    frozen but for the transformer, which the caller trains."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging
    logging.disable_progress_bar()
    if path == "tiny-sd3":
        pipe = tiny_sd3(seed, resolution)
    elif path == "tiny-wan":
        pipe = tiny_wan(seed)
    else:
        with open(os.path.join(path, "model_index.json")) as f:
            absent = {k: None for k, v in json.load(f).items()
                      if isinstance(v, list) and v[0] is None}
        pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32, **absent)
    pipe.to(device)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False).eval()
            # loaded weights sit at the safetensors file's offsets (24 bytes past a 64-byte line
            # here): an AVX-512 CPU sums a misaligned matmul in another order, so a resumed run
            # would drift from the saved one in the last bit. Copies are aligned.
            for t in [*m.parameters(), *m.buffers()]:
                t.data = t.data.clone()
    return pipe


# Prompts and the default reward: a prompt names a colour and a side, and the reward is how much
# brighter that colour is on that side of the image than on the other. The tiny pipeline's random
# VAE cannot make a whole image red (its decoder's group norms undo a latent's overall offset), but
# it can make one side redder than the other. Its random text encoders are another matter: with
# prompts asking for each of 3 colours on either side, 400 steps learned nothing (the policy has to
# learn to read the prompt first); so the built-in prompts all ask for red on the left (other nouns
# held out), which it learns in minutes (RESULTS.md). --data gives other prompts.
COLOURS = {"red": 0, "green": 1, "blue": 2}
SIDES = ("left", "right")
THINGS = {"train": ("square", "patch", "glow", "blob", "light", "shape", "spot", "block"),
          "test": ("stripe", "cloud", "dot", "ball")}


def builtin_prompts(split):
    """The built-in prompts: 8 to train on, 4 held out (other nouns), all red on the left."""
    return [dict(id=f"{split}{i}", prompt=f"a red {t} on the left")
            for i, t in enumerate(THINGS[split])]


def colour_side(image, row):
    """Mean of the prompt's colour channel on its side minus the other side's, in [-1, 1]; image
    (3, H, W) or a video (3, F, H, W), all its frames."""
    words = row["prompt"].lower().replace(",", " ").split()
    c = next((COLOURS[w] for w in words if w in COLOURS), None)
    s = next((w for w in words if w in SIDES), None)
    if c is None or s is None:
        raise ValueError(f"prompt {row['prompt']!r} names no colour ({', '.join(COLOURS)}) or side")
    half = image.shape[-1] // 2
    left, right = image[c, ..., :half].mean(), image[c, ..., half:].mean()
    return float(left - right if s == "left" else right - left)


def load_prompts(path):
    """Prompt rows {id, prompt} from .txt (a prompt a line) or .jsonl (objects with a non-empty
    prompt string; id optional, unique). A bad row stops the run at start, naming its line, as
    data.load_rows does: a long run should not find it later or silently train on fewer."""
    rows, seen = [], set()
    with open(path) as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        if not path.endswith(".jsonl"):
            rows.append(dict(id=f"{os.path.basename(path)}:{n}", prompt=line.strip()))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: malformed JSON ({e.msg})") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: expected an object with a non-empty prompt string")
        row["id"] = str(row.get("id", f"{os.path.basename(path)}:{n}"))
        if row["id"] in seen:
            raise ValueError(f"{where}: duplicate id {row['id']!r}")
        seen.add(row["id"])
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


# -----------------------------------------------------------------------------
# The sampler with log-probs, and the pieces the trainer recomputes them with.

def embed(pipe, prompts, args):
    """The frozen text encoders' conditioning of prompts, the transformer's keyword arguments:
    SD3's encoder_hidden_states (B, L, D) and pooled_projections (B, P), Wan's the first alone;
    with --cfg, the empty prompt's first on the batch axis (2B, ...)."""
    cfg = args.cfg > 1
    with torch.no_grad():
        if is_video(pipe):
            e, ne = pipe.encode_prompt(prompts, None, cfg, max_sequence_length=args.text_len)
            pos, neg = dict(encoder_hidden_states=e), dict(encoder_hidden_states=ne)
        else:
            e, ne, p, np_ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=cfg,
                                               max_sequence_length=args.text_len)
            pos = dict(encoder_hidden_states=e, pooled_projections=p)
            neg = dict(encoder_hidden_states=ne, pooled_projections=np_)
    return {k: torch.cat([neg[k], pos[k]]) for k in pos} if cfg else pos


def repeat(emb, n):
    """`embed`'s conditioning with each row repeated n times (a prompt's n samples)."""
    return {k: t.repeat_interleave(n, 0) for k, t in emb.items()}


def velocity(transformer, x, sigma, emb, cfg):
    """v(x, sigma | prompt), shaped as x: (B, C, h, w) images or (B, C, t, h, w) videos; sigma (B,),
    emb as `embed` gives for these B rows; cfg > 1: one pass over the empty and the real prompt,
    then guided."""
    if cfg > 1:
        x, sigma = torch.cat([x, x]), torch.cat([sigma, sigma])
    t = sigma * 1000  # FlowMatchEulerDiscreteScheduler's timesteps: sigma x num_train_timesteps
    v = transformer(hidden_states=x, timestep=t, **emb, return_dict=False)[0]
    if cfg > 1:
        vu, vc = v.chunk(2)
        v = vu + cfg * (vc - vu)
    return v


def sde_step(v, x, s, s_next, a, s_1, noise=None, x_next=None):
    """Flow-GRPO's SDE step (docstring item 2) from x at sigma s (B,) to s_next (B,): (x_next, its
    log-prob (B,) as a mean over elements, the Gaussian's mean, its std (B,)). x_next is drawn with
    noise (like x) unless given (the trainer's recompute). s_1: the schedule's second sigma, which
    stands in for s in 1 - s at s = 1 (else std is infinite there)."""
    s, s_next = s.view(-1, *[1] * (x.dim() - 1)), s_next.view(-1, *[1] * (x.dim() - 1))
    dt = s_next - s
    std_t = a * (s / (1 - torch.where(s == 1, torch.full_like(s, s_1), s))).sqrt()
    mean = x + (v + std_t ** 2 / (2 * s) * (x + (1 - s) * v)) * dt
    std = std_t * (-dt).sqrt()
    if x_next is None:
        x_next = mean + std * noise
    logp = -(x_next - mean) ** 2 / (2 * std ** 2) - std.log() - 0.5 * math.log(2 * math.pi)
    return x_next, logp.mean(dim=tuple(range(1, x.dim()))), mean, std.flatten()


def sigmas_of(pipe, n):
    """The scheduler's n + 1 sigmas, 1 down to 0 (its shift applied), as a CPU fp32 tensor."""
    pipe.scheduler.set_timesteps(n)
    return pipe.scheduler.sigmas.float().cpu()


def latent_shape(pipe, args):
    """One sample's latents: (C, h, w) for an image, (C, t, h, w) for a video (Wan's VAE encodes
    the first frame alone and each next scale_factor_temporal frames into one latent frame)."""
    C = pipe.transformer.config.in_channels
    if not is_video(pipe):
        return C, args.resolution // pipe.vae_scale_factor, args.resolution // pipe.vae_scale_factor
    tf, hw = pipe.vae_scale_factor_temporal, args.resolution // pipe.vae_scale_factor_spatial
    if (args.frames - 1) % tf:
        raise SystemExit(f"--frames {args.frames}: must be 1 + a multiple of {tf} for this VAE")
    return C, (args.frames - 1) // tf + 1, hw, hw


def sample(pipe, emb, seeds, steps, a, cfg, shape):
    """One sample per seed through `steps` SDE steps (a = 0: the ODE), without gradients; shape as
    `latent_shape` gives. Each sample's noise, first and at every step, comes from its own seed.
    Returns the trajectory (N, steps + 1, *shape), each step's log-prob (N, steps) and the schedule
    (steps + 1,)."""
    tr = pipe.transformer
    noise = torch.stack([torch.randn(steps + 1, *shape, generator=torch.Generator().manual_seed(s))
                         for s in seeds]).to(tr.device)  # (N, steps + 1, *shape)
    sig = sigmas_of(pipe, steps).to(tr.device)
    x, xs, lps = noise[:, 0], [noise[:, 0]], []
    with torch.no_grad():
        for k in range(steps):
            s, s_next = sig[k].expand(len(seeds)), sig[k + 1].expand(len(seeds))
            v = velocity(tr, x, s, emb, cfg)
            x, lp, _, _ = sde_step(v, x, s, s_next, a, float(sig[1]), noise=noise[:, k + 1])
            xs.append(x)
            lps.append(lp)
    return torch.stack(xs, 1), torch.stack(lps, 1), sig


def decode(pipe, latents):
    """Images (N, 3, H, W) or videos (N, 3, F, H, W) in [0, 1] from final latents (N, C, ...)."""
    c = pipe.vae.config
    if is_video(pipe):  # Wan's latents are normalized per channel: (z - mean) / std
        stat = [torch.tensor(x, device=latents.device).view(-1, 1, 1, 1)
                for x in (c.latents_std, c.latents_mean)]
        z = latents * stat[0] + stat[1]
    else:
        z = latents / c.scaling_factor + (c.shift_factor or 0.0)
    with torch.no_grad():
        return (pipe.vae.decode(z, return_dict=False)[0] / 2 + 0.5).clamp(0, 1).float().cpu()


def step_logprobs(transformer, rows, emb, args, sig):
    """The trainer's log-probs (n, K) of the stored transitions of rows (each: traj, steps, the K
    step indices it trains on), with the means and stds for the KL term; emb as `embed` gives for
    one prompt, repeated over the n x K transitions here."""
    n, K = len(rows), len(rows[0]["steps"])
    idx = torch.tensor([k for x in rows for k in x["steps"]])
    traj = torch.stack([x["traj"] for x in rows])  # (n, S + 1, *latent_shape)
    b = torch.arange(n).repeat_interleave(K)
    x, x_next = traj[b, idx], traj[b, idx + 1]
    s, s_next = sig[idx].to(x.device), sig[idx + 1].to(x.device)
    e = repeat(emb, n * K) if args.cfg <= 1 else {
        k: torch.cat([t[:1].expand(n * K, *t.shape[1:]), t[1:].expand(n * K, *t.shape[1:])])
        for k, t in emb.items()}
    v = velocity(transformer, x, s, e, args.cfg)
    _, lp, mean, std = sde_step(v, x, s, s_next, args.noise_level, float(sig[1]), x_next=x_next)
    return lp.view(n, K), mean, std


def gaussian_kl(mean, ref_mean, std):
    """Per transition KL between N(mean, std^2) and N(ref_mean, std^2), mean over elements:
    ||mean - ref_mean||^2 / (2 std^2) (Flow-GRPO's KL term, arXiv 2505.05470; the same std)."""
    d = (mean - ref_mean) ** 2
    return d.mean(dim=tuple(range(1, d.dim()))) / (2 * std ** 2)


# -----------------------------------------------------------------------------
# Ulysses over a Wan transformer's video tokens, installed from outside through public hooks: the
# rope's output and the first block's input are cut to this rank's block of tokens, the
# self-attention runs as `ulysses_wan_attention`, and proj_out's output is gathered. Every other
# layer (modulation, cross-attention to the text, feed-forward) acts on each token alone.

def use_ulysses(transformer, sp_group):
    """Split the Wan transformer's token sequence over sp_group, whose size must divide its heads
    and (at the first call) its tokens. Each rank runs the model on the whole input and gets the
    whole velocity; its parameters' gradients are its tokens' share (mr_sp.sync_grads sums them)."""
    sp, r = torch.distributed.get_world_size(sp_group), torch.distributed.get_rank(sp_group)
    heads = transformer.config.num_attention_heads
    if heads % sp:
        raise SystemExit(f"--sp {sp}: the transformer's {heads} attention heads do not divide "
                         "by it")

    def split(t):  # (B, L, ...) -> this rank's block (B, L/sp, ...)
        L = t.shape[1]
        if L % sp:
            raise SystemExit(f"--sp {sp}: a video of {L} tokens (latent frames x height/2 x "
                             "width/2) does not split evenly; change --frames or --resolution")
        return t[:, r * L // sp:(r + 1) * L // sp]
    transformer.rope.register_forward_hook(lambda m, inp, out: tuple(split(t) for t in out))
    transformer.blocks[0].register_forward_pre_hook(lambda m, a: (split(a[0]), *a[1:]))
    transformer.proj_out.register_forward_hook(
        lambda m, inp, out: mr_sp.gather_sequence(out, sp_group))
    for b in transformer.blocks:
        b.attn1.set_processor(functools.partial(ulysses_wan_attention, sp_group))


def wan_rotary(x, cos, sin):
    """Wan's rotary embedding of x (B, l, H, D): each pair (x[2i], x[2i+1]) turned by the angle
    whose cos and sin the rope module gives (B, l, 1, D), each twice (as diffusers' processor)."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2).type_as(x)


def ulysses_wan_attention(sp_group, attn, x, encoder_hidden_states=None, attention_mask=None,
                          rotary_emb=None):
    """A Wan self-attention layer (diffusers' WanAttnProcessor, minus the image-to-video branch) on
    this rank's block x (B, l, d) of the tokens: projections, norms and rotary on the block, an
    all-to-all to this rank's heads over all tokens, attention (not causal), and back."""
    q, k, v = attn.norm_q(attn.to_q(x)), attn.norm_k(attn.to_k(x)), attn.to_v(x)
    q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))  # (B, l, H, D)
    q, k = wan_rotary(q, *rotary_emb), wan_rotary(k, *rotary_emb)
    q, k, v = mr_sp.scatter_heads([t.transpose(1, 2) for t in (q, k, v)], sp_group)  # (B, H/sp, L, D)
    y = mr_sp.gather_heads(torch.nn.functional.scaled_dot_product_attention(q, k, v), sp_group)
    return attn.to_out[0](y.flatten(2, 3).type_as(x))


# -----------------------------------------------------------------------------
# One step: rollouts of G samples a prompt, rewards on their pixels, updates.

def rollouts(args, i, pipe, prompts, reward_fn, stats):
    """This rank's training rows for step i: each prompt's G samples with their trajectories,
    sampler log-probs, the steps they train on and advantages, and the rewards of all (a list)."""
    rows, rewards = [], []
    sig = None
    for row in prompts:
        emb = embed(pipe, [row["prompt"]], args)
        seeds = [mr_sp.seed_of(args.seed, i, row["id"], j) for j in range(args.G)]
        traj, lps, sig = sample(pipe, repeat(emb, args.G), seeds, args.denoise, args.noise_level,
                                args.cfg, latent_shape(pipe, args))
        images = decode(pipe, traj[:, -1])
        try:
            r = [grpo.score(reward_fn, im, row)["overall"] for im in images]
        except Exception as err:  # a broken reward function must not kill a long run
            print(f"reward function failed on prompt {row['id']}: {err!r}; its group is skipped",
                  file=sys.stderr)
            stats["reward_errors"] += 1
            continue
        rewards += r
        adv = grpo.group_advantages(torch.tensor(r), args.G).clamp(-args.adv_clip, args.adv_clip)
        K = args.train_steps or args.denoise
        for j in range(args.G):
            pick = torch.randperm(args.denoise, generator=torch.Generator().manual_seed(seeds[j]))
            steps = sorted(pick[:K].tolist())
            rows.append(dict(key=row["id"], emb=emb, traj=traj[j], steps=steps,
                             old=lps[j, steps], adv=float(adv[j]), reward=r[j]))
    return rows, rewards, sig


def update(args, tr, ref, opt, params, rows, sig, stats, sp_group=None, run=mr_sp.call):
    """--epochs passes of --mini-batches AdamW updates over this rank's rows (docstring items 6, 7);
    sp_group: this rank's SP group (its peers hold the same rows); run: mr_sp.shard's root (--fsdp),
    each pass through it, as many on every rank. Returns the step's logged means."""
    micro, mini_idx = grpo.mini_batches(rows, args.mini_batches, args.micro_batch,
                                      mr_sp.sharded(tr))  # weight-0 copies: "keep"
    K = args.train_steps or args.denoise
    counts = [mr_sp.dp_sum(dict(n=sum(x.get("keep", 1.0) for m in idx for x in micro[m]) * K),
                           sp_group) for idx in mini_idx]
    log = dict(kl=0.0, clip_frac=0.0, grad_norm=0.0, logprob_gap=0.0)
    w = 1.0 / (args.epochs * max(sum(1 for c in counts if c["n"]), 1))
    for epoch in range(args.epochs):
        for u, (idx, c) in enumerate(zip(mini_idx, counts)):
            if not c["n"]:
                continue
            for m in idx:
                mb = micro[m]
                lp, mean, std = run(step_logprobs, tr, mb, mb[0]["emb"], args, sig)
                old = torch.stack([x["old"] for x in mb])
                if epoch == 0 and u == 0:  # before any update: the sampler's numbers, float error
                    gap = float((lp.detach() - old).abs().max())
                    log["logprob_gap"] = max(log["logprob_gap"], gap)
                adv = torch.tensor([x["adv"] for x in mb])
                mask = torch.tensor([[x.get("keep", 1.0)] for x in mb]).expand_as(lp)
                loss, clipped = grpo.policy_loss(lp, old, adv, mask, "clip", args.clip, args.clip,
                                                 dual_clip=0)
                if ref is not None:
                    with torch.no_grad():
                        _, ref_mean, _ = step_logprobs(ref, mb, mb[0]["emb"], args, sig)
                    kl = gaussian_kl(mean, ref_mean, std).view_as(lp)
                    loss = loss + args.kl_coef * kl
                    log["kl"] += w * float((kl.detach() * mask).sum()) / c["n"]
                grpo.aggregate(loss, mask, "token", c["n"], None).backward()
                log["clip_frac"] += w * float((clipped * mask).sum()) / c["n"]
            gn, skipped = mr_sp.optimizer_step(params, opt, args.grad_clip)
            if skipped:  # (stats need no key until a step is skipped)
                stats["skipped_updates"] += 1
            log["grad_norm"] += w * gn
    log.update(mr_sp.dp_sum({k: log[k] for k in ("kl", "clip_frac")}, sp_group))
    log["logprob_gap"] = float(mr_sp.all_reduce(torch.tensor([log["logprob_gap"]]), "max"))
    return log


def evaluate(args, pipe, rows, par, reward_fn):
    """Mean reward of the held-out rows over all ranks (rows range(dp rank, N, dp)), --eval-samples
    ODE samples each (a = 0, --eval-denoise steps, seeds (seed, "eval", id, j)); and this rank's
    images (or videos)."""
    mine = rows[par.dp_rank::par.dp]
    images, total, n = [], 0.0, 0.0
    for row in mine:
        emb = repeat(embed(pipe, [row["prompt"]], args), args.eval_samples)
        seeds = [mr_sp.seed_of(args.seed, "eval", row["id"], j) for j in range(args.eval_samples)]
        traj, _, _ = sample(pipe, emb, seeds, args.eval_denoise, 0.0, args.cfg,
                            latent_shape(pipe, args))
        ims = list(decode(pipe, traj[:, -1]))
        images += ims
        try:
            r = [grpo.score(reward_fn, im, row)["overall"] for im in ims]
            total, n = total + sum(r), n + len(r)
        except Exception as err:
            print(f"reward function failed on held-out prompt {row['id']}: {err!r}",
                  file=sys.stderr)
    s = mr_sp.dp_sum(dict(total=total, n=n), par.sp_group)
    return s["total"] / max(s["n"], 1.0), images


def save_grid(rows_of_images, path, scale=4):
    """A PNG of image rows (each a list of (3, H, W) in [0, 1]), each image scaled up `scale` x; a
    video (3, F, H, W) stands as its frames, top to bottom."""
    from PIL import Image
    rows_of_images = [[im if im.dim() == 3 else torch.cat(im.unbind(1), 1) for im in r]
                      for r in rows_of_images]
    grid = torch.cat([torch.cat(r, 2) for r in rows_of_images], 1)  # (3, rows x H, cols x W)
    arr = (grid.permute(1, 2, 0) * 255).round().byte().numpy()
    img = Image.fromarray(arr)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def save(pipe, out, state, weights=None):
    """The pipeline as a diffusers folder with state.pt beside, atomically (model.save_atomic);
    weights: the transformer's whole state dict, saved in place of its (sharded) own."""
    if weights is not None:  # a copy on the meta device takes the gathered tensors, no new memory
        with torch.device("meta"):
            t = type(pipe.transformer).from_config(pipe.transformer.config)
        t.load_state_dict(weights, assign=True)
        pipe = type(pipe)(**{**pipe.components, "transformer": t})

    def fill(tmp):
        pipe.save_pretrained(tmp)
        torch.save(state, os.path.join(tmp, "state.pt"))
    M.save_atomic(out, fill)


def build(args, par, src, state):
    """The pipeline from src, its transformer trained (sharded with --fsdp, Ulysses with --sp), the
    frozen reference (the initial transformer; None without --kl-coef), run, params and AdamW."""
    pipe = load(src, par.device, args.seed, args.resolution)
    tr = pipe.transformer
    tr.requires_grad_(True)
    ref = copy.deepcopy(tr).requires_grad_(False) if args.kl_coef else None
    if ref is not None and state:  # the reference is the initial transformer, not the resumed one
        ref = load(args.init, par.device, args.seed, args.resolution).transformer
    if par.sp_group is not None:
        if not is_video(pipe):
            raise SystemExit("--sp: Ulysses is written for the Wan transformer only (SD3 attends "
                             "jointly over image and text tokens)")
        for m in (tr, ref) if ref is not None else (tr,):
            use_ulysses(m, par.sp_group)
    fsdp = args.fsdp and par.world > 1  # one process holds everything either way
    blocks = tr.blocks if is_video(pipe) else tr.transformer_blocks
    run = mr_sp.shard(tr, blocks=blocks) if fsdp else mr_sp.call
    params = list(tr.parameters())  # after shard, which replaces them
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    return pipe, tr, ref, run, params, opt


def report(args, pipe, run, held, par, reward_fn, first, stats, ckpt):
    """The held-out reward after training beside the one before, the before/after grid, the JSON
    line."""
    after, ims = mr_sp.unsharded(run, evaluate, args, pipe, held, par, reward_fn)
    grid = os.path.join(args.out, "grid.png")
    if par.rank == 0:
        save_grid([first["images"], ims], grid)
        print(f"held-out reward ({len(held)} prompts, ODE, {args.eval_denoise} steps): "
              f"{first['reward']:.4f} before -> {after:.4f} after; {grid}: before (top), after")
        print(json.dumps({"out": ckpt, "steps": args.steps, "eval_before": first["reward"],
                          "eval_after": after, "grid": grid, **stats}))


def main(args):
    if args.G < 2:
        ap.error("--G must be at least 2: an advantage compares a sample with its prompt's others")
    if not 0 < args.train_steps <= args.denoise and args.train_steps:
        ap.error(f"--train-steps must be in [1, --denoise = {args.denoise}] or 0 (all)")
    par = mr_sp.init_parallel(args.sp)
    if args.prompts % par.dp:
        raise SystemExit(f"--prompts {args.prompts} must be a multiple of the {par.dp} "
                         "data-parallel ranks (processes / --sp)")
    ckpt = os.path.join(args.out, "model")
    src, state = M.resume(ckpt) if args.resume else (args.init, None)
    pipe, tr, ref, run, params, opt = build(args, par, src, state)
    start = mr_sp.load_state(tr, opt, state)
    cursor, stats, first = ((state["cursor"], state["stats"], state["eval"]) if state else
                            (0, {"reward_errors": 0, "skipped_updates": 0}, None))
    train = load_prompts(args.data) if args.data else builtin_prompts("train")
    held = load_prompts(args.eval_data) if args.eval_data else builtin_prompts("test")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    reward_fn = colour_side if args.reward is None else grpo.load_reward(args.reward)
    if first is None:
        r0, ims = mr_sp.unsharded(run, evaluate, args, pipe, held, par, reward_fn)
        first = dict(reward=r0, images=ims)
    if par.rank == 0:
        mr_sp.open_log(args, start)
        print(f"Flow-GRPO from {args.init}: {len(train)} prompts, {len(held)} held out, "
              f"{par.world} process(es), G={args.G}, {sum(p.numel() for p in params) / 1e6:.2f}M "
              f"trainable parameters; held-out reward before: {first['reward']:.4f}")
    per = args.prompts // par.dp
    for i in tqdm(range(start, args.steps), initial=start, total=args.steps, desc="flow_grpo",
                  disable=par.rank != 0):
        t0 = time.perf_counter()
        at = grpo.prompt_positions(cursor, par.dp_rank, par.dp, per, 0, per)
        prompts = [train[order[a % len(order)]] for a in at]
        cursor += per * par.dp
        tr.eval()
        rows, rewards, sig = mr_sp.unsharded(run, rollouts, args, i, pipe, prompts, reward_fn,
                                             stats)
        t1 = time.perf_counter()
        tr.train()
        log = update(args, tr, ref, opt, params, rows, sig, stats, par.sp_group, run)
        s = mr_sp.dp_sum(dict(reward=sum(rewards), n=len(rewards),
                              std=sum(float(torch.tensor(rewards[k:k + args.G]).std())
                                      for k in range(0, len(rewards), args.G))), par.sp_group)
        groups = max(s["n"] / args.G, 1.0)
        rec = dict(step=i + 1, reward=s["reward"] / max(s["n"], 1.0), reward_std=s["std"] / groups,
                   **log, time_rollout=t1 - t0, time_update=time.perf_counter() - t1, **stats)
        if par.rank == 0:
            mr_sp.log_step(args.out, rec, " | ".join([
                f"step {i + 1}", f"reward {rec['reward']:.4f}",
                f"group std {rec['reward_std']:.4f}", f"kl {rec['kl']:.2e}",
                f"clip {rec['clip_frac']:.3f}", f"gnorm {rec['grad_norm']:.3f}",
                f"lp gap {rec['logprob_gap']:.0e}",
                f"rollout {rec['time_rollout']:.1f}s update {rec['time_update']:.1f}s"]))
        if (args.save_every and (i + 1) % args.save_every == 0) or i + 1 == args.steps:
            sd, state = mr_sp.save_state(tr, opt, step=i + 1, cursor=cursor, stats=stats, eval=first)
            if par.rank == 0:  # save_state: a collective
                save(pipe, ckpt, state, sd)
    tr.eval()
    report(args, pipe, run, held, par, reward_fn, first, stats, ckpt)
    mr_sp.shutdown()


if __name__ == "__main__":
    main(ap.parse_args())
