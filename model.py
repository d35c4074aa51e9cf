"""The model layer every stage shares: a thin layer over transformers' Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, Qwen3.5 and the Qwen2.5-Omni thinker (which also hears).

    python model.py check --hf DIR     # our path vs transformers' full forward on a local HF folder
    python model.py check --hf tiny-qwen3-vl   # the same on a tiny model built in code (see TINY)
    python model.py check --hf tiny-qwen2.5-omni   # and a video with its sound, audio alone
    python model.py save --out DIR --family tiny-qwen3-vl   # write a tiny model as a Hugging Face folder

In order: the tiny models (tokenizer, config of each family), load/save, encode images, videos and
audio, prompts, splice, our M-RoPE positions, batch layout, forward, per-token log-probs, generation
(chunked `prefill` into a KV cache, `decode` of n samples sharing it through
`shared_prefix_attention`) and its naive no-cache reference.

Conventions shared by every stage:
- A sample's visual input is one video, one image or none (text only); data.py gives it as
  (kind, pixel_values, grid_thw, second_per_grid, frame_times). `encode_pixels` turns it into the
  embeddings that RL caches and reuses; Qwen3-VL's DeepStack features travel with them,
  concatenated along the hidden dimension, and `forward` adds them after the first layers.
- Qwen2.5-Omni's thinker also hears: a sample may carry audio as data.audio_features gives it
  (input_features (1, 128, n), feature_attention_mask (1, n)), alone (kind "audio") or as a video's
  own sound (kind "video": interleaved with it in time chunks, its use_audio_in_video);
  `encode_mels` turns it into embeddings, `splice` places them at the <|AUDIO|> tokens.
- The families differ here only in data (config values, prompt expansion, position rule), never
  in which functions run: one `if` per difference, no per-family copies.
- Position ids are always ours (`positions`, each family's original rule, which vLLM computes),
  passed explicitly.
- A batch row is [left padding | prompt | response | right padding]; response token j sits at
  position max(prompt positions) + 1 + j in rollout and in training alike.
- The policy never emits vision special tokens: `banned_ids` are masked to -inf both when
  sampling and when scoring, so the sampler and the trainer describe the same distribution."""
import argparse
import functools
import itertools
import json
import os
import shutil
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2.5-Omni's tokenizer names the same roles otherwise (at the same ids in its releases:
# <|vision_bos|> is 151652, as <|vision_start|> is in Qwen2.5-VL's) and has three audio tokens
OMNI_NAMES = {"<|vision_start|>": "<|vision_bos|>", "<|vision_end|>": "<|vision_eos|>",
              "<|image_pad|>": "<|IMAGE|>", "<|video_pad|>": "<|VIDEO|>"}
AUDIO_SPECIAL = ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
OMNI_SPECIAL = SPECIAL[:3] + AUDIO_SPECIAL + [OMNI_NAMES.get(s, s) for s in SPECIAL[3:]]
# the media tokens, Qwen2.5-Omni's among them
VISION_SPECIAL = (["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
                  + list(OMNI_NAMES.values()) + AUDIO_SPECIAL)
# Qwen2.5-VL's chat template, reduced to text and video parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('video', 'image') %}<|vision_start|><|{{ part['type'] }}_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
OMNI_TEMPLATE = CHAT_TEMPLATE.replace(  # Qwen2.5-Omni's: its names, and audio parts
    "{% if part['type'] in ('video', 'image') %}<|vision_start|><|{{ part['type'] }}_pad|><|vision_end|>",
    "{% if part['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif part['type'] in ('video', 'image') %}<|vision_bos|><|{{ part['type'] | upper }}|><|vision_eos|>")
# Text the tiny tokenizer's merges are learned from; any text still encodes (byte-level BPE).
CORPUS = """You are a helpful assistant. Watch the video and answer the question.
Think step by step inside <think> </think>, then give the letter of the correct option inside \
<answer> </answer>.
Think step by step inside <think> </think>, then give the final answer inside <answer> </answer>.
The screen flashes four different colors, one at a time. Which color flashes first? Which color flashes last?
The screen flashes green at 0.5 s, then purple at 4.5 s, then blue at 6.5 s, then yellow at 7.5 s.
The first flash is green, so the answer is A. The last flash is red, so the answer is B.
How many times does the whole screen flash yellow? Yellow appears 4 times, so the answer is D.
Red appears 1 time, so the answer is A. Blue appears 2 times. Cyan appears 3 times, so the answer is C.
Large squares appear one at a time in different corners of the screen. Where does the blue square appear?
I see a blue square in the top left at 0.5 s, then a green square in the bottom right at 1.5 s, then a red
square in the top right at 6.5 s. The blue square is in the top left, so the answer is A.
A large yellow square moves steadily across the screen during the whole video. In which direction \
does it move?
At the start the yellow square is at the bottom of the screen; by the end it is at the top.
It moves bottom to top, so the answer is D. It moves left to right. It moves right to left. \
It moves top to bottom.
A. green B. blue C. purple D. yellow A. 1 B. 2 C. 3 D. 4 A. top left B. top right C. bottom left \
D. bottom right
red green blue yellow white black purple orange cyan magenta gray. first second third fourth last.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 30 40 50 60 70 80 90 100.
What happens in this video? Describe the video. The person in the video moves the object to the left.
"""


# -----------------------------------------------------------------------------
# The tiny model, built in code: no download, varied outputs from a random init.

def tiny_tokenizer(vocab_size=1024, omni=False):
    """Byte-level BPE trained in-process on CORPUS (at most vocab_size ids; CORPUS yields ~580),
    with Qwen's special tokens and chat template (omni: Qwen2.5-Omni's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special, template = (OMNI_SPECIAL, OMNI_TEMPLATE) if omni else (SPECIAL, CHAT_TEMPLATE)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=special[1:], chat_template=template)


FAMILIES = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL", "qwen3_vl": "Qwen3VL",
            "qwen3_5": "Qwen3_5", "qwen2_5_omni_thinker": "Qwen2_5OmniThinker"}  # model_type: class
# Qwen3-VL's vision (16-pixel patches, mean and std 0.5, a video as timestamped one-group grids),
# which Qwen3.5 keeps (without DeepStack); Qwen3.5's language model is hybrid: Gated DeltaNet layers
# ("linear_attention", a causal convolution and a recurrent state, no KV cache) and gated attention.
QWEN3 = ("qwen3_vl", "qwen3_5")
# Qwen2.5-Omni's thinker: Qwen2.5-VL's vision and language model, an audio tower (Whisper's
# encoder), and TMRoPE: 25 positions a second (position_id_per_seconds), audio one a 40 ms token
OMNI = "qwen2_5_omni_thinker"


def recurrent(config):
    """Whether the language model has Gated DeltaNet layers (Qwen3.5): a state carried along the
    sequence instead of a KV cache, which the rollout engine, Ulysses and packed passes carry
    (`decode`, `mr_sp.ulysses_gdn`)."""
    return "linear_attention" in (getattr(config.get_text_config(), "layer_types", None) or ())


# --init names of the tiny models built in code: (family, tiny_config arguments). "tiny:<name>" are
# miniatures of real checkpoints: the real one's query and KV heads, tied or untied embeddings,
# vision tower layout (window and full-attention blocks, DeepStack taps) at tiny widths and depths,
# so what the real shape runs into (Ulysses over 28 heads, FSDP over an untied lm_head) shows on a
# CPU. The real configs are mr_sp.REAL (the planner's); tests/test_model.py checks each against its.
TINY = {"tiny": ("qwen2_5_vl", {}), "tiny-qwen2-vl": ("qwen2_vl", {}), "tiny-qwen2.5-vl": ("qwen2_5_vl", {}),
        "tiny-qwen3-vl": ("qwen3_vl", {}), "tiny-qwen3.5": ("qwen3_5", dict(layers=4)),
        "tiny-qwen2.5-omni": (OMNI, {}),
        "tiny:qwen2.5-vl-7b": ("qwen2_5_vl", dict(hidden=448, heads=28, kv_heads=4, tie=False,
                                                  vision_depth=4, fullatt=(1, 3))),
        "tiny:qwen2.5-vl-3b": ("qwen2_5_vl", dict(hidden=256, heads=16, kv_heads=2, tie=True,
                                                  vision_depth=4, fullatt=(1, 3))),
        "tiny:qwen3-vl-8b": ("qwen3_vl", dict(hidden=512, heads=32, kv_heads=8, tie=False, vision_depth=4)),
        "tiny:qwen3.5-9b": ("qwen3_5", dict(hidden=512, heads=16, kv_heads=4, gdn_heads=(16, 32), layers=4,
                                            tie=False, vision_depth=4))}


def tiny_config(tok, family="qwen2_5_vl", hidden=192, layers=3, heads=6, kv_heads=3, vision_hidden=128,
                vision_depth=2, vision_heads=4, window=112, fullatt=(0, 1), init_std=0.1, tie=True,
                attention_every=4, gdn_heads=None):
    """A small config of one family (by default the 2.59M-parameter Qwen2.5-VL that learned the
    synthetic task from scratch on a CPU in about 10 minutes). init_std 0.1: the library's 0.02
    makes a random tiny model repeat one token, so every "same tokens" test would pass vacuously;
    0.3 varies too, but its large logits cost fp32 exactness (KV-cache vs recompute log-probs differ
    by 4e-5 instead of 5e-6). Qwen3-VL's DeepStack taps every vision block but the last (2 features
    for depth 3) and its M-RoPE sections are interleaved, as in its releases."""
    import transformers
    head_dim = hidden // heads
    t = head_dim // 8  # mrope_section must sum to head_dim/2; Qwen's ratio is 16:24:24 (Qwen3-VL 24:20:20)
    section = [t, (head_dim // 2 - t) // 2, (head_dim // 2 - t) // 2]
    names = OMNI_NAMES if family == OMNI else {}
    ids = {s: tok.convert_tokens_to_ids(names.get(s, s)) for s in SPECIAL + AUDIO_SPECIAL}
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=65536, initializer_range=init_std,
                rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=section),
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    vision, extra = dict(depth=vision_depth, num_heads=vision_heads, initializer_range=init_std), {}
    if family == "qwen2_vl":  # no window attention, no seconds in M-RoPE
        vision.update(embed_dim=vision_hidden, hidden_size=hidden, mlp_ratio=2)
    elif family in ("qwen2_5_vl", OMNI):
        vision.update(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, out_hidden_size=hidden,
                      window_size=window, fullatt_block_indexes=list(fullatt))
        if family == "qwen2_5_vl":
            vision.update(tokens_per_second=2)
        else:  # the audio tower as released (128 mels, attention within windows of 2 s: n_window
            # 100) at the tower's width and depth; 25 positions a second, 2 s chunks: defaults
            extra = dict(audio_config=dict(num_mel_bins=128, n_window=100, d_model=vision_hidden,
                                           encoder_layers=vision_depth, encoder_attention_heads=vision_heads,
                                           encoder_ffn_dim=2 * vision_hidden, output_dim=hidden,
                                           initializer_range=init_std),
                         audio_token_id=ids["<|AUDIO|>"], audio_start_token_id=ids["<|audio_bos|>"],
                         audio_end_token_id=ids["<|audio_eos|>"],
                         initializer_range=init_std)  # the thinker's own: an untied lm_head's init
    elif family in QWEN3:
        h = head_dim // 2
        text.update(head_dim=head_dim, rope_parameters=dict(
            rope_type="default", rope_theta=5e6, mrope_interleaved=True,
            mrope_section=[h - 2 * (h * 5 // 16), h * 5 // 16, h * 5 // 16]))
        vision.update(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, out_hidden_size=hidden,
                      num_position_embeddings=64)
        if family == "qwen3_vl":
            vision.update(deepstack_visual_indexes=list(range(vision_depth - 1)))
        else:  # Qwen3.5: Gated DeltaNet layers too
            text.update(_qwen3_5_text(head_dim, layers, kv_heads, attention_every, gdn_heads, tie))
    else:
        raise ValueError(f"unknown family {family!r}: one of {', '.join(FAMILIES)}")
    return getattr(transformers, FAMILIES[family] + "Config")(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=tie, **extra)


def _qwen3_5_text(head_dim, layers, kv_heads, attention_every, gdn_heads, tie):
    """Qwen3.5's text config (`tiny_config`): a quarter of each head rotary (11:11:10 of its 32
    frequencies), attention every 4th layer (attention_every), Gated DeltaNet layers between, (key,
    value) heads gdn_heads, default paired as its releases (value = 2 x key, key = kv_heads)."""
    r = head_dim // 8
    rope = dict(rope_type="default", rope_theta=1e7, mrope_interleaved=True,
                partial_rotary_factor=0.25, mrope_section=[r - 2 * (r // 3), r // 3, r // 3])
    types = ["full_attention" if (i + 1) % attention_every == 0 else "linear_attention"
             for i in range(layers)]
    nk, nv = gdn_heads or (kv_heads, 2 * kv_heads)
    # tie in text_config too: vLLM 0.32 reads it there for Qwen3.5 (else a zero lm_head)
    return dict(rope_parameters=rope, layer_types=types, tie_word_embeddings=tie,
                linear_num_key_heads=nk, linear_num_value_heads=nv, linear_key_head_dim=head_dim,
                linear_value_head_dim=head_dim, linear_conv_kernel_dim=4)


# -----------------------------------------------------------------------------
# Load and save Hugging Face folders.

def attn_implementation(device):
    """flash-attn on CUDA when installed, else PyTorch SDPA (the CPU path, and the tested one)."""
    if torch.device(device).type == "cuda":
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load(path="tiny", dtype=torch.float32, device="cpu", seed=0, **tiny_kwargs):
    """(model, tokenizer) from a local Hugging Face folder of any family, or a tiny model built in
    code (TINY: "tiny" is Qwen2.5-VL's; "tiny:qwen2.5-vl-7b" a miniature of the real one). A whole
    Qwen2.5-Omni folder (thinker, talker, token2wav) gives its thinker alone."""
    import transformers
    attn = attn_implementation(device)
    if path in TINY:
        family, kw = TINY[path]
        tok = tiny_tokenizer(omni=family == OMNI)
        torch.manual_seed(seed)
        config = tiny_config(tok, family, **{**kw, **tiny_kwargs})
        config._attn_implementation = attn
        model = getattr(transformers, FAMILIES[family] + "ForConditionalGeneration")(config)
        for m in model.modules():
            if hasattr(m, "A_log"):  # GDN: transformers draws A in [0.01, 16]: most heads forget
                # all but the last few tokens, and a state handed to the wrong prompt or sample
                # would go unseen; decays of 0.9 to 0.999 a token keep each head's prompt memory
                m.A_log.data.copy_(torch.linspace(0.001, 0.05, len(m.A_log)).log())
    else:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json); pass a "
                                    f"local folder or one of {', '.join(TINY)} (no downloads here)")
        tok = transformers.AutoTokenizer.from_pretrained(path)
        with open(os.path.join(path, "config.json")) as f:
            whole_omni = json.load(f).get("model_type") == "qwen2_5_omni"
        # the thinker class reads a whole folder's thinker_config and its weights under thinker.*
        # (the talker's and token2wav's it reports as unexpected and leaves)
        cls = (transformers.Qwen2_5OmniThinkerForConditionalGeneration if whole_omni
               else transformers.AutoModelForImageTextToText)
        model = cls.from_pretrained(path, dtype=dtype, attn_implementation=attn)
        if model.config.model_type not in FAMILIES:
            raise ValueError(f"{path}: model_type {model.config.model_type!r}, "
                             f"not one of {', '.join(FAMILIES)}")
    return model.to(device=device, dtype=dtype).eval(), tok


def save(model, tok, out, write=None, state_dict=None, state=None):
    """Write a folder transformers and vLLM load; write(tmp_dir) may add files; state (the training
    state: optimizer, step, for `resume`) goes in state.pt; state_dict replaces the model's own (a
    sharded model's, gathered: mr_sp.save_state). Atomic (temp name, then rename): a crash mid-write
    leaves no half checkpoint under the final name."""
    def fill(tmp):
        from transformers.utils import logging
        logging.disable_progress_bar()  # one bar per checkpoint would bury the training log
        model.save_pretrained(tmp, state_dict=state_dict)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
            json.dump(processor_config(model.config), f, indent=1)
        if state is not None:
            torch.save(state, os.path.join(tmp, "state.pt"))
        if write is not None:
            write(tmp)
    save_atomic(out, fill)


def save_atomic(out, fill):
    """fill(tmp) writes a folder at a temp name, then it becomes out by renames: a crash mid-write
    leaves no half checkpoint under the final name (`resume` finds out or out.old)."""
    out = out.rstrip("/")
    tmp, old = out + ".tmp", out + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    fill(tmp)
    if os.path.exists(out):
        os.replace(out, old)  # a crash until the next rename leaves only out.old: see `resume`
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def processor_config(config):
    """The family's preprocessor_config.json, the values Qwen ships (sizes from the config): vLLM
    and transformers' AutoProcessor need it to load a folder; data.py patchifies and normalizes with
    its patch_size, image_mean and image_std (Qwen3-VL: 16-pixel patches, mean and std 0.5)."""
    vc, clip = config.vision_config, config.model_type not in QWEN3
    out = dict(image_processor_type="Qwen2VLImageProcessor",
               processor_class=FAMILIES[config.model_type].replace("Thinker", "") + "Processor",
               patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size,
               merge_size=vc.spatial_merge_size, min_pixels=3136, max_pixels=12845056,
               image_mean=[0.48145466, 0.4578275, 0.40821073] if clip else [0.5] * 3,
               image_std=[0.26862954, 0.26130258, 0.27577711] if clip else [0.5] * 3)
    if config.model_type == OMNI:  # its audio feature extractor's too (data.audio_features computes them)
        out.update(feature_extractor_type="WhisperFeatureExtractor", feature_size=128, sampling_rate=16000,
                   hop_length=160, n_fft=400, chunk_length=300, padding_value=0.0, dither=0.0,
                   return_attention_mask=True)
    return out


def resume(out):
    """(folder, training state) of the checkpoint save() last completed at out: out itself, or
    out.old when a crash fell between save()'s two renames. weights_only: state.pt holds tensors,
    numbers, lists and dicts only, and a checkpoint from elsewhere must not run code when loaded."""
    for path in (out.rstrip("/"), out.rstrip("/") + ".old"):
        if os.path.isfile(os.path.join(path, "state.pt")):
            return path, torch.load(os.path.join(path, "state.pt"), weights_only=True)
    raise FileNotFoundError(f"{out}: no checkpoint to resume from (no state.pt)")


# -----------------------------------------------------------------------------
# Pixels in, embeddings out; text in, token ids out. A sample's visual input is one video, one
# image, or none (text only); images and video frames alike are rows of 2 x patch x patch pixels.

def parts(model):
    """(the module holding the towers and their get_*_features, the language model): model.model and
    model.model.language_model; Qwen2.5-Omni's thinker holds its towers itself (visual,
    audio_tower), and its language model is model.model."""
    if model.config.model_type == OMNI:
        return model, model.model
    return model.model, model.model.language_model


def towers(model):
    """The encoders, {name: module}: the vision tower and Qwen2.5-Omni's audio tower (held by
    `parts`' first; frozen in RL, where the reference drops them)."""
    holder = parts(model)[0]
    return {k: getattr(holder, k) for k in ("visual", "audio_tower") if getattr(holder, k, None) is not None}


def encode_pixels(model, pixel_values, grid_thw):
    """(patches, 3*2*p*p) pixels + (n, 3) grids -> (n_tokens, width): the vision tower alone, what
    RL caches (computed once per prompt, reused by every rollout and pass). Qwen3-VL's DeepStack
    features, added to the first decoder layers' hidden states at the visual positions, ride along
    concatenated: width (1 + k) * hidden, [embeddings | feature 0 | ...], as vLLM takes them."""
    visual = parts(model)[0].visual
    out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw)
    return torch.cat([out.pooler_output, *(getattr(out, "deepstack_features", None) or [])], -1)


def encode_mels(model, input_features, feature_attention_mask):
    """Qwen2.5-Omni's audio tower: log-mels (B, 128, n) and their mask (B, n) (data.audio_features;
    clips of different lengths padded to the longest) -> (tokens, hidden), the clips' in order, 25 a
    second (data.audio_tokens)."""
    tower, keep = model.audio_tower, feature_attention_mask.bool()
    feats = input_features.transpose(1, 2)[keep].T  # (128, kept frames of all clips)
    return tower(feats.to(tower.dtype), feature_lens=keep.sum(-1)).last_hidden_state


def n_visual_tokens(grid_thw, merge=2):
    return int(torch.as_tensor(grid_thw).prod(-1).sum()) // (merge * merge)


def pad_ids(config, audio=False):
    """The ids a visual embedding replaces: <|video_pad|> and <|image_pad|>; audio: those an audio
    embedding replaces (Qwen2.5-Omni's <|AUDIO|>; none in the other families)."""
    if audio:
        ids = [config.audio_token_id] if config.model_type == OMNI else []
        return torch.tensor(ids, dtype=torch.long)
    return torch.tensor([config.video_token_id, config.image_token_id])


def build_prompt(tok, config, text, kind=None, grid_thw=None, frame_times=None, expand=True,
                 second_per_grid=None, audio=0):
    """Chat-template ids of a user turn (a video, an image or audio, then text; kind None: text
    only) with the assistant turn opened. The template's <|vision_start|><|*_pad|><|vision_end|> is
    expanded without tokenizing the pads: one pad per visual token; for a Qwen3-VL video, one
    "<t seconds>" (tokenized alone, as vLLM does) and its own start/end per temporal group, t the
    mean time of the group's frames (frame_times, seconds, one per sampled frame). Qwen2.5-Omni
    (its own names for these tokens): audio is the number of audio tokens, of kind "audio" or of a
    video's own sound, laid out with it as `audio_in_video` says (which needs second_per_grid).
    expand=False: the ids vLLM expands to the same (one pad; for a Qwen3-VL video, the pad
    alone)."""
    content = ([{"type": kind}] if kind else []) + [{"type": "text", "text": text}]
    s = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                tokenize=False)
    if kind is None:
        return tok.encode(s, add_special_tokens=False)
    enc = lambda x: tok.encode(x, add_special_tokens=False)  # noqa: E731
    if kind == "audio":
        start, pad, end = config.audio_start_token_id, config.audio_token_id, config.audio_end_token_id
    else:
        start, end = config.vision_start_token_id, config.vision_end_token_id
        pad = getattr(config, f"{kind}_token_id")
    head, tail = s.split("".join(tok.convert_ids_to_tokens([start, pad, end])))
    if kind == "video" and audio and expand:
        mid = audio_in_video(config, grid_thw, second_per_grid, audio)
        return enc(head) + [start] + mid + [end] + enc(tail)
    n = audio if kind == "audio" else n_visual_tokens(grid_thw, config.vision_config.spatial_merge_size)
    if config.model_type not in QWEN3 or kind != "video":
        return enc(head) + [start] + [pad] * (n if expand else 1) + [end] + enc(tail)
    if not expand:
        return enc(head) + [pad] + enc(tail)
    groups = int(torch.as_tensor(grid_thw)[0, 0])
    if len(frame_times or ()) != 2 * groups:
        raise ValueError(f"a Qwen3-VL video of {groups} temporal groups needs {2 * groups} frame times, "
                         f"got {len(frame_times or ())}")
    per = [start] + [pad] * (n // groups) + [end]
    mid = [x for t in group_times(frame_times) for x in enc(f"<{t:.1f} seconds>") + per]
    return enc(head) + mid + enc(tail)


def group_times(frame_times):
    """Qwen3-VL's timestamp of each temporal group: the mean time of its two frames, seconds."""
    return [(a + b) / 2 for a, b in zip(frame_times[::2], frame_times[1::2])]


def audio_in_video(config, grid_thw, second_per_grid, n_audio):
    """Qwen2.5-Omni's video with its own sound (use_audio_in_video): the ids it puts between
    <|vision_bos|> and <|vision_eos|>, <|audio_bos|> ... <|audio_eos|>. Video tokens by their
    temporal position (`temporal`) and audio tokens by theirs (0, 1, ...: 25 a second) are cut into
    chunks of seconds_per_chunk x 25 positions (`chunk_bounds`); video chunk j, then audio chunk
    j."""
    t, h, w = torch.as_tensor(grid_thw).view(3).tolist()
    merge = config.vision_config.spatial_merge_size
    video = temporal(config, t, second_per_grid).repeat_interleave(h * w // merge ** 2).tolist()
    size = int(config.position_id_per_seconds * config.seconds_per_chunk)
    v, a = chunk_bounds(video, size), chunk_bounds(range(n_audio), size)
    out = [config.audio_start_token_id]
    for (v0, v1), (a0, a1) in itertools.zip_longest(v, a, fillvalue=(0, 0)):
        out += [config.video_token_id] * (v1 - v0) + [config.audio_token_id] * (a1 - a0)
    return out + [config.audio_end_token_id]


def chunk_bounds(values, size):
    """[start, end) of each chunk of nondecreasing values: chunk k - 1 closes before the first value
    at or past k * size, then k advances by one, at most once a value (transformers'
    get_chunked_index, which Qwen2.5-Omni's processor and get_rope_index share). So values that leap
    several chunks, as a temporal group longer than a chunk does, open one chunk a token: 0, 0, 100,
    100 at size 50 give [0, 0], [100], [100], not [0, 0], [], [100, 100]."""
    out, start, k = [], 0, 1
    for i, v in enumerate(values):
        if v >= k * size:
            out.append((start, i))
            start, k = i, k + 1
    return out + [(start, len(values))]


@functools.lru_cache(maxsize=8)  # per tokenizer: get_vocab() of a 150k vocabulary is not free
def banned_ids(tok):
    """Vision special tokens: the policy must never emit them (a sampled <|video_pad|> would ask
    the next forward for a video embedding that does not exist)."""
    return torch.tensor([tok.convert_tokens_to_ids(s) for s in VISION_SPECIAL if s in tok.get_vocab()])


def splice(model, input_ids, visual, audio=None):
    """Token embeddings with the visual embeddings (None: none) placed, in order, at the
    <|video_pad|> and <|image_pad|> positions, and Qwen2.5-Omni's audio embeddings (`encode_mels`)
    at its <|AUDIO|> positions. With DeepStack features (`encode_pixels`), the result is as wide as
    they are, zero past the token embedding at text positions (`forward` splits it)."""
    x = model.get_input_embeddings()(input_ids)
    for what, emb, ids in (("visual", visual, pad_ids(model.config)),
                           ("audio", audio, pad_ids(model.config, audio=True))):
        slots = torch.isin(input_ids, ids.to(input_ids.device))
        n = 0 if emb is None else emb.shape[0]
        if int(slots.sum()) != n:
            raise ValueError(f"{int(slots.sum())} {what} pad tokens but {n} {what} embeddings")
        if emb is not None:
            x = F.pad(x, (0, emb.shape[-1] - x.shape[-1]))
            x = x.masked_scatter(slots[..., None], emb.to(x.dtype))
    return x


# -----------------------------------------------------------------------------
# M-RoPE positions, the original rule of each family (what vLLM computes): text advances by 1; a
# video of llm grid (t, h, w) starting at s gets (s + temporal(i), s + row, s + col) for temporal
# group i; the text after it resumes at max(all positions so far) + 1 (transformers >= 5.19 resumes
# at s + max(h, w), differing whenever t > 1). temporal(i): Qwen2-VL i;
# Qwen2.5-VL int(i * (second_per_grid * tokens_per_second)); Qwen3-VL writes each group as its own
# one-group grid between timestamps, so 0 (time is in the text). An image is a one-group grid.
# Qwen2.5-VL's product is float64 with the factor formed first, as vLLM 0.32 does: float32, or
# (i * second_per_grid) * tokens_per_second, truncate differently for some frame rates (at 31/14 s
# per group, group 7 is 30 instead of 31), and rollout and training would disagree there.
# Qwen2.5-Omni (TMRoPE, its get_rope_index): temporal(i) int(i * second_per_grid * 25) in float32 as
# transformers forms it (at 2/3 s per group, group 3 is 50; float64 gives 49); audio tokens advance
# by 1 in all three, as text; a video's own sound (`audio_in_video`) starts with the video at s,
# each token at s + k in all three, and the pairs <|vision_bos|><|audio_bos|> and
# <|audio_eos|><|vision_eos|> around them each share one position.

def temporal(config, t, second_per_grid):
    """(t,) temporal position offsets of a video's t temporal groups, each family's arithmetic."""
    if config.model_type == OMNI:
        s = torch.tensor(float(second_per_grid))  # float32
        return (torch.arange(t) * s * config.position_id_per_seconds).long()
    tps = getattr(config.vision_config, "tokens_per_second", None)
    step = float(second_per_grid) * tps if tps else 1.0
    return torch.tensor([int(i * step) for i in range(t)], dtype=torch.long)  # float64 math


def positions(ids, grid_thw, second_per_grid, config):
    """(L,) token ids of one sequence -> (3, L) position ids. grid_thw: (n, 3) in patches, one row
    per video or image in order; second_per_grid: n floats (seconds covered by one temporal group;
    any value for an image). Audio needs no grid: its tokens are counted in ids."""
    ids = torch.as_tensor(ids)
    merge = config.vision_config.spatial_merge_size
    runs = []  # (llm grid, temporal offsets) of each run of pad tokens
    for g, spg in zip(torch.as_tensor(grid_thw).view(-1, 3).tolist(), second_per_grid):
        t, h, w = g[0], g[1] // merge, g[2] // merge
        if config.model_type in QWEN3:
            runs += [((1, h, w), torch.zeros(1, dtype=torch.long))] * t
        else:
            runs.append(((t, h, w), temporal(config, t, spg)))
    audio = torch.isin(ids, pad_ids(config, audio=True))
    is_vis = torch.isin(ids, pad_ids(config)) | audio
    tied = torch.zeros(len(ids), dtype=torch.bool)  # a token at the position of the one before it
    if config.model_type == OMNI:
        a, b = ids[:-1], ids[1:]
        tied[1:] = (((a == config.vision_start_token_id) & (b == config.audio_start_token_id))
                    | ((a == config.audio_end_token_id) & (b == config.vision_end_token_id)))
    cuts = [0] + ((is_vis[1:] != is_vis[:-1]).nonzero()[:, 0] + 1).tolist() + [len(ids)]
    pos, cur, v = [], 0, 0
    for i, j in zip(cuts[:-1], cuts[1:]):  # runs of text tokens and of pad tokens
        if not is_vis[i] or audio[i:j].all():  # text, or audio alone
            pos.append((cur - 1 + (~tied[i:j]).long().cumsum(0)).expand(3, -1))
        else:
            if v >= len(runs):
                raise ValueError(f"more runs of visual pad tokens than grids ({len(runs)})")
            (t, h, w), tt = runs[v]
            video = ~audio[i:j]  # all of the run but a video's own sound
            if int(video.sum()) != t * h * w:
                raise ValueError(f"run {v}: {int(video.sum())} visual pad tokens but grid {t}x{h}x{w} = "
                                 f"{t * h * w}")
            grid = torch.stack(torch.meshgrid(tt, torch.arange(h), torch.arange(w), indexing="ij"))
            p = torch.zeros(3, j - i, dtype=torch.long)
            p[:, video] = grid.reshape(3, -1)
            p[:, ~video] = torch.arange(j - i - t * h * w)
            pos.append(p + cur)
            v += 1
        cur = int(pos[-1].max()) + 1
    if v != len(runs):
        raise ValueError(f"{len(runs)} visual grids but {v} runs of visual pad tokens")
    return torch.cat(pos, dim=1) if pos else torch.zeros(3, 0, dtype=torch.long)


def layout(prompts, prompt_pos, responses=None, pad_id=0):
    """Batch rows as [left padding | prompt | response | right padding]. prompts: list of id lists;
    prompt_pos: list of (3, P_i) from `positions`; responses: list of id lists or None. Returns ids
    (B, L), pos (3, B, L), mask (B, L) and P (prompt width: every row's response starts at column
    P). Response token j is at max(prompt pos) + 1 + j, exactly where generate puts it."""
    B, P = len(prompts), max(len(p) for p in prompts)
    T = max((len(r) for r in responses), default=0) if responses else 0
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    pos = torch.zeros(3, B, P + T, dtype=torch.long)
    mask = torch.zeros(B, P + T, dtype=torch.long)
    for b, (p, pp) in enumerate(zip(prompts, prompt_pos)):
        ids[b, P - len(p):P] = torch.as_tensor(p)
        pos[:, b, P - len(p):P] = pp
        mask[b, P - len(p):P] = 1
        nxt = int(pp.max()) + 1 if pp.numel() else 0
        pos[:, b, P:] = torch.arange(nxt, nxt + T)
        if responses:
            r = responses[b]
            ids[b, P:P + len(r)] = torch.as_tensor(r, dtype=torch.long)
            mask[b, P:P + len(r)] = 1
    return ids, pos, mask, P


def pack(prompt, prompt_pos, responses, pad_id=0):
    """One prompt's rows as one sequence [prompt | response 1 | ... | response B], each response
    right-padded to T columns, which `packed_attention` runs as the B rows [prompt | response j]
    (the prompt's layers once, not B times). Returns ids (1, P+B*T), pos (3, 1, P+B*T): each
    response at the positions `layout` gives it, P, T, and `sources`."""
    P, B, T = len(prompt), len(responses), max(len(r) for r in responses)
    ids = torch.full((1, P + B * T), pad_id, dtype=torch.long)
    ids[0, :P] = torch.as_tensor(prompt)
    for j, r in enumerate(responses):
        ids[0, P + j * T:P + j * T + len(r)] = torch.as_tensor(r, dtype=torch.long)
    nxt = int(prompt_pos.max()) + 1
    pos = torch.cat([prompt_pos, torch.arange(nxt, nxt + T).repeat(B).expand(3, -1)], 1)[:, None]
    return ids, pos, P, T


def sources(P, T, B):
    """(B, T) column of a `pack`ed sequence whose hidden state predicts response j's token k: the
    prompt's last column for every response's first token, then the response's own columns."""
    at = P - 1 + torch.arange(B)[:, None] * T + torch.arange(T)
    at[:, 0] = P - 1
    return at


def packed_attention(q, k, v, P, T, scale=None):
    """Attention of a `pack`ed sequence, q (1, H, L, D), k, v (1, Hkv, L, D) -> (1, H, L, D): the
    prompt's P columns causal over themselves; each block of T columns after (a response; the last
    may be shorter: padding) over the prompt and causally over itself (the lower-right causal mask
    of its T queries over P + T keys), exactly the rows [prompt | response] run one by one. A
    block's keys are a copy of the prompt's and its own, so its attention is recomputed in backward
    rather than saved (B copies of the prompt's keys and values a layer otherwise)."""
    from torch.nn.attention.bias import causal_lower_right
    kw = dict(scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    out = [F.scaled_dot_product_attention(q[:, :, :P], k[:, :, :P], v[:, :, :P], is_causal=True, **kw)]

    def block(q, kp, vp, kr, vr):
        t = q.shape[2]  # CUDA: flash attention's own lower-right causal; elsewhere SDPA builds the mask
        bias = (causal_lower_right(t, P + t) if q.is_cuda else
                torch.ones(t, P + t, dtype=torch.bool, device=q.device).tril(P))
        return F.scaled_dot_product_attention(q, torch.cat([kp, kr], 2), torch.cat([vp, vr], 2),
                                              attn_mask=bias, **kw)

    for s in range(P, q.shape[2], T):
        args = (q[:, :, s:s + T], k[:, :, :P], v[:, :, :P], k[:, :, s:s + T], v[:, :, s:s + T])
        out.append(checkpoint(block, *args, use_reentrant=False) if torch.is_grad_enabled() else block(*args))
    return torch.cat(out, 2)


# -----------------------------------------------------------------------------
# Forward and per-token log-probs.

def forward(model, embeds, pos, mask=None, cache=None, **kw):
    """Language model from input embeddings and explicit (3, B, L) positions -> (B, L, hidden).
    kw reach the attention function (`shared_prefix_attention`'s prefix, Ulysses' group)."""
    H = model.config.get_text_config().hidden_size
    if embeds.shape[-1] > H:  # DeepStack features (Qwen3-VL, `splice`): zero at text positions, so
        # adding them at every position is adding them at the visual ones, exactly, in any slice
        embeds, deep = embeds[..., :H], embeds[..., H:].flatten(0, 1)
        kw.update(visual_pos_masks=torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device),
                  deepstack_visual_embeds=list(deep.split(H, -1)))
    out = parts(model)[1](inputs_embeds=embeds, position_ids=pos, attention_mask=mask,
                          past_key_values=cache, use_cache=cache is not None, **kw)
    return out.last_hidden_state


def _head_logprobs(lm_head, h, y, temperature, banned):
    logits = lm_head(h).float() / temperature  # (N, V)
    if banned is not None:
        logits = logits.index_fill(-1, banned.to(logits.device), float("-inf"))
    logp = logits.log_softmax(-1)
    ent = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
    return logp.gather(-1, y[:, None])[:, 0], ent


def token_logprobs(model, hidden, targets, temperature=1.0, banned=None, chunk=1024):
    """log p(targets) and entropy from hidden states (B, T, H) predicting targets (B, T). lm_head
    runs on `chunk` tokens at a time, recomputed in backward under autograd (activation
    checkpointing): at most chunk x vocab logits at once, not GBs (150k vocab x 1000s of tokens)."""
    B, T, H = hidden.shape
    h, y = hidden.reshape(B * T, H), targets.reshape(B * T)
    lps, ents = [], []
    for s in range(0, B * T, chunk):
        args = (model.lm_head, h[s:s + chunk], y[s:s + chunk], temperature, banned)
        lp, ent = (checkpoint(_head_logprobs, *args, use_reentrant=False) if torch.is_grad_enabled()
                   else _head_logprobs(*args))
        lps.append(lp)
        ents.append(ent)
    return torch.cat(lps).view(B, T), torch.cat(ents).view(B, T)


def response_logprobs(model, embeds, pos, mask, P, targets, **kw):
    """Log-probs (and entropies) of the response tokens targets (B, T) of a `layout` batch: the
    hidden state at column P-1+j predicts response token j. No logits outside the response."""
    T = targets.shape[1]
    hidden = forward(model, embeds[:, :P + T - 1], pos[:, :, :P + T - 1],
                     None if mask is None else mask[:, :P + T - 1])
    return token_logprobs(model, hidden[:, P - 1:], targets, **kw)


# -----------------------------------------------------------------------------
# Generation: a KV-cache generate, and the naive one it must equal.

def sample(logits, temperature, top_p, generator=None):
    """One token per row from logits (B, V) -> (token, its log-prob under the temperature-scaled
    distribution before top-p, which the trainer scores); greedy at temperature 0 (log-prob at
    temperature 1). generator: one torch.Generator, or a list splitting the rows into equal
    consecutive groups (one per prompt), so a prompt samples the same whatever shares its batch."""
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0]
    logp = (logits / temperature).log_softmax(-1)
    probs = logp.exp()
    if top_p < 1.0:
        sp, idx = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp >= top_p  # keep the smallest prefix whose mass reaches top_p
        probs = probs.scatter(-1, idx, sp.masked_fill(drop, 0.0))
    if isinstance(generator, (list, tuple)):
        groups = probs.chunk(len(generator))
        tok = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(groups, generator)])[:, 0]
    else:
        tok = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tok, logp.gather(-1, tok[:, None])[:, 0]


def _next_logits(model, h, banned):
    logits = model.lm_head(h).float()
    return logits if banned is None else logits.index_fill(-1, banned.to(logits.device), float("-inf"))


def _finish(toks, lps, eos, pad_id):
    """Stack per-step tokens; everything after a row's first EOS becomes padding (log-prob 0)."""
    toks, lps = torch.stack(toks, 1), torch.stack(lps, 1)
    is_eos = torch.isin(toks, eos)
    after = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    lengths = (~after).sum(1)
    return toks.masked_fill(after, pad_id), lps.masked_fill(after, 0.0), lengths


def shared_prefix_attention(module, q, k, v, attention_mask=None, scaling=None, prefix=None, **kw):
    """Decode attention of n samples per prompt (transformers' registry name "shared_prefix"): over
    their prompt's KV cache, held once, and over each sample's own tokens so far, merged exactly by
    the log-sum-exp of each part (as cascade / shared-prefix attention kernels do), so memory does
    not grow with n. q (B*n, H, 1, D); k, v (B*n, Hkv, t, D): the samples' own keys and values,
    never padded; prefix: dict(cache: the prompts' (B rows), mask: (B, P) their padding, n,
    sp_group). With an SP group (mr_sp.sp_prefill) each rank holds its columns of the prompts'
    cache: every rank's queries attend to them here, and `_merge_over` returns each rank its
    queries' parts, merged.
    Returns (B*n, 1, H, D)."""
    layer = prefix["cache"].layers[module.layer_idx]
    kp, vp = layer.keys, layer.values  # (B, Hkv, P, D)
    B, Hkv, P, D = kp.shape
    n, g = prefix["n"], q.shape[1] // Hkv  # samples a prompt, heads a KV head
    sp_group = prefix.get("sp_group")
    qp = q.view(B, n, Hkv, g, D).transpose(1, 2).reshape(B, Hkv, n * g, D)  # a prompt's queries
    if sp_group is not None:  # every rank's queries: (B, Hkv, sp*n*g, D), rank-major
        parts = [torch.empty_like(qp) for _ in range(dist.get_world_size(sp_group))]
        dist.all_gather(parts, qp.contiguous(), group=sp_group)
        qp = torch.cat(parts, 2)
    s1 = (qp @ kp.transpose(-1, -2)).float() * scaling  # (B, Hkv, n*g, P)
    s1 = s1.masked_fill(~prefix["mask"].bool()[:, None, None, :], float("-inf"))
    s2 = (q.view(B * n, Hkv, g, D) @ k.transpose(-1, -2)).float() * scaling  # (B*n, Hkv, g, t)
    lse1, lse2 = s1.logsumexp(-1, keepdim=True), s2.logsumexp(-1, keepdim=True)
    # the prompt's values read in their storage dtype (an fp32 copy in every layer at every step
    # would be GBs a token at 7B); the probabilities rounded to it, as flash-decoding kernels do
    o1 = ((s1 - lse1).exp().to(vp.dtype) @ vp).float()  # (B, Hkv, n*g, D): softmax over the prompt
    if sp_group is not None:
        o1, lse1 = _merge_over(o1, lse1, sp_group)
    o2 = (s2 - lse2).exp() @ v.float()  # (B*n, Hkv, g, D): over the sample's own tokens alone
    o1 = o1.view(B, Hkv, n, g, D).transpose(1, 2).reshape(B * n, Hkv, g, D)
    lse1 = lse1.view(B, Hkv, n, g, 1).transpose(1, 2).reshape(B * n, Hkv, g, 1)
    lse = torch.logaddexp(lse1, lse2)  # softmax over both = each part weighted by its mass
    out = o1 * (lse1 - lse).exp() + o2 * (lse2 - lse).exp()
    return out.reshape(B * n, 1, Hkv * g, D).to(q.dtype), None


def _merge_over(o, lse, sp_group):
    """Attention of every rank's queries over this rank's keys (o (B, Hkv, sp*m, D) fp32, lse (...,
    1), rank-major) -> this rank's m queries over all ranks' keys: an all-to-all returns each rank
    its queries' parts, merged by their log-sum-exp. A rank whose keys are all padding sends
    weight 0 (lse -inf, o NaN there)."""
    o = o.masked_fill(lse == float("-inf"), 0.0)
    sp = dist.get_world_size(sp_group)
    x = torch.cat([o, lse], -1).unflatten(2, (sp, -1)).movedim(2, 0).contiguous()
    got = torch.empty_like(x)
    dist.all_to_all_single(got, x, group=sp_group)  # (sp, B, Hkv, m, D+1): from each rank
    o, lse = got[..., :-1], got[..., -1:]
    total = lse.logsumexp(0)
    return (o * (lse - total).exp()).sum(0), total


def set_state(layer, conv, rec):
    """A GDN layer's cache (transformers' LinearAttentionLayer) set to a prompt's state: conv (B,
    channels, kernel) the convolution's last inputs, rec (B, heads, dk, dv) the recurrent state."""
    layer.lazy_initialization(conv, rec)
    layer.update_conv_state(conv)  # its first update is a prefill's: stored as given
    layer.update_recurrent_state(rec)


def prefill(model, embeds, pos, mask, chunk=1024):
    """A left-padded prompt batch, embeds (B, P, H), pos (3, B, P), mask (B, P), run `chunk` tokens
    at a time (activations bounded by the chunk, not the prompt; 0: all at once) into a KV cache.
    Returns the cache and the last column's hidden states (B, H), which predict the first token."""
    from transformers import DynamicCache
    cache, P = DynamicCache(config=model.config.get_text_config()), embeds.shape[1]
    for s in range(0, P, chunk or P):
        e = min(P, s + (chunk or P))
        m = None if mask is None else mask[:, :e]
        h = forward(model, embeds[:, s:e], pos[:, :, s:e], m, cache)[:, -1]
    return cache, h


@torch.no_grad()
def decode(model, cache, mask, h, nxt, n=1, max_new=64, temperature=1.0, top_p=1.0, eos_ids=(),
           banned=None, pad_id=0, generator=None, sp_group=None):
    """n samples per prompt from a prefilled batch (`prefill`'s cache and h, mask (B, P) its
    padding; nxt (B,) each prompt's first response position). The samples decode together over the
    prompt's cache held once (`shared_prefix_attention`) and their own tokens. Returns tokens (B*n,
    T) (padding after EOS), log-probs (B*n, T), lengths (B*n,) with EOS; a prompt's rows adjacent.
    With sp_group, cache and mask are this rank's columns of the prompts' (mr_sp.sp_prefill) and the
    SP group's ranks decode in step, each its own samples, until every rank's are done."""
    from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
    from transformers.masking_utils import sdpa_mask
    cfg = model.config.get_text_config()
    own, shared = DynamicCache(config=cfg), dict(cache=cache, mask=mask, n=n, sp_group=sp_group)
    for a, b in zip(cache.layers, own.layers):
        if hasattr(a, "recurrent_states"):  # a GDN layer: what it carries of the prompt is a fixed
            # state (the convolution's last inputs, the recurrence's heads x dk x dv) a sample
            set_state(b, *(x[0].repeat_interleave(n, 0) for x in (a.conv_states, a.recurrent_states)))
    eos = torch.as_tensor(list(eos_ids), dtype=torch.long, device=h.device)
    h, nxt = h.repeat_interleave(n, 0), nxt.repeat_interleave(n)
    toks, lps, done = [], [], torch.zeros(len(nxt), dtype=torch.bool, device=h.device)
    AttentionInterface.register("shared_prefix", shared_prefix_attention)
    AttentionMaskInterface.register("shared_prefix", sdpa_mask)
    impl = cfg._attn_implementation
    model.set_attn_implementation({"text_config": "shared_prefix"})
    try:
        for i in range(max_new):
            tok, lp = sample(_next_logits(model, h, banned), temperature, top_p, generator)
            toks.append(tok)
            lps.append(lp)
            done |= torch.isin(tok, eos)
            finished = done.all().float()
            if sp_group is not None:  # every rank's attention needs every other's queries
                dist.all_reduce(finished, dist.ReduceOp.MIN, group=sp_group)
            if bool(finished) or i == max_new - 1:
                break
            step_pos = (nxt + i).view(1, -1, 1).expand(3, -1, 1)
            h = forward(model, model.get_input_embeddings()(tok[:, None]), step_pos, None, own,
                        prefix=shared)[:, -1]
    finally:
        model.set_attn_implementation({"text_config": impl})
    return _finish(toks, lps, eos, pad_id)


@torch.no_grad()
def generate(model, embeds, pos, mask, n=1, chunk=1024, **kw):
    """Sample n responses for each row of a left-padded prompt batch: embeds (B, P, H), pos (3, B,
    P), mask (B, P). Each prompt is prefilled once (`prefill`, in chunks) into a KV cache its n
    samples share (`decode`, whose arguments kw are: max_new, temperature, top_p, eos_ids, banned,
    pad_id, generator). Returns decode's tokens, log-probs and lengths."""
    cache, h = prefill(model, embeds, pos, mask, chunk)
    return decode(model, cache, mask, h, pos.amax(dim=(0, 2)) + 1, n, **kw)


@torch.no_grad()
def generate_naive(model, embeds, pos, mask, n=1, max_new=64, temperature=1.0, top_p=1.0,
                   eos_ids=(), banned=None, pad_id=0, generator=None):
    """The reference for `generate`: rows repeated n times, all re-run per new token, no cache."""
    eos = torch.as_tensor(list(eos_ids), dtype=torch.long, device=embeds.device)
    embeds, pos, mask = (embeds.repeat_interleave(n, 0), pos.repeat_interleave(n, 1),
                         mask.repeat_interleave(n, 0))
    nxt = pos.amax(dim=(0, 2)) + 1
    toks, lps, done = [], [], torch.zeros(len(nxt), dtype=torch.bool, device=embeds.device)
    for i in range(max_new):
        h = forward(model, embeds, pos, mask)[:, -1]
        tok, lp = sample(_next_logits(model, h, banned), temperature, top_p, generator)
        toks.append(tok)
        lps.append(lp)
        done |= torch.isin(tok, eos)
        if bool(done.all()):
            break
        e = model.get_input_embeddings()(tok[:, None])  # zero DeepStack part, as `splice` gives text
        embeds = torch.cat([embeds, F.pad(e, (0, embeds.shape[-1] - e.shape[-1]))], 1)
        pos = torch.cat([pos, (nxt + i).view(1, -1, 1).expand(3, -1, 1)], 2)
        mask = torch.cat([mask, mask.new_ones(len(nxt), 1)], 1)
    return _finish(toks, lps, eos, pad_id)


# -----------------------------------------------------------------------------
# python model.py check / save

def random_samples(model, grids=((4, 8, 8), (2, 4, 6)), kind="video", seed=0, second_per_grid=None):
    """Samples as data.py gives them, of random pixels, one per grid (sampled at 1 fps, 2 fps, ...,
    or second_per_grid[i] seconds a temporal group; kind "image": grids (1, h, w); None: text only):
    inputs for `check` and the tests."""
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    row = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    out = []
    for i, grid in enumerate(grids):
        spg = second_per_grid[i] if second_per_grid else 2.0 / (1 + i)
        out.append(dict(kind=kind, grid_thw=torch.tensor([grid]), second_per_grid=spg,
                        pixel_values=torch.randn(grid[0] * grid[1] * grid[2], row, generator=g),
                        frame_times=[k * spg / 2 for k in range(2 * grid[0])]) if kind else dict(kind=None))
    return out


def random_audio(seconds, seed=0):
    """A sample's sound as data.audio_features gives it (100 frames a second), of random
    log-mels."""
    n = round(100 * seconds)
    return dict(input_features=torch.randn(1, 128, n, generator=torch.Generator().manual_seed(seed)),
                feature_attention_mask=torch.ones(1, n, dtype=torch.long))


def prompt_of(tok, config, sample, text):
    """A sample's prompt ids and (3, P) positions; sample: data.py's (kind, and for a video or an
    image grid_thw, second_per_grid, frame_times; with sound, feature_attention_mask)."""
    kind, audio = sample.get("kind"), 0
    if "feature_attention_mask" in sample:
        from data import audio_tokens
        audio = int(audio_tokens(sample["feature_attention_mask"].sum()))
    ids = build_prompt(tok, config, text, kind, sample.get("grid_thw"), sample.get("frame_times"),
                       second_per_grid=sample.get("second_per_grid"), audio=audio)
    if kind in (None, "audio"):
        return ids, positions(ids, [], [], config)
    return ids, positions(ids, sample["grid_thw"], [sample["second_per_grid"]], config)


def reference_features(model, sample):
    """transformers' own encode of a sample (its get_*_features), laid out as encode_pixels
    returns."""
    get = getattr(parts(model)[0], f"get_{sample['kind']}_features")
    f = get(sample["pixel_values"], sample["grid_thw"])
    deep = getattr(f, "deepstack_features", None) or []
    return torch.cat([torch.cat(f.pooler_output), *map(torch.cat, deep)], -1)


def reference_audio(model, sample):
    """transformers' own encode of a sample's sound (the Qwen2.5-Omni thinker's
    get_audio_features)."""
    f = model.get_audio_features(sample["input_features"], sample["feature_attention_mask"])
    return f.last_hidden_state


def reference_logits(model, ids, pos, sample):
    """transformers' full forward from pixels and audio features (from ids alone for text) at the
    given positions; pos None (Qwen2.5-Omni): at its own, get_rope_index's."""
    kind, kw = sample.get("kind"), {}
    if kind in ("video", "image"):
        kw = {"pixel_values_videos" if kind == "video" else "pixel_values": sample["pixel_values"],
              f"{kind}_grid_thw": sample["grid_thw"]}
    if "input_features" in sample:
        kw.update(input_features=sample["input_features"], use_audio_in_video=kind == "video",
                  feature_attention_mask=sample["feature_attention_mask"])
    if pos is None:  # it computes positions only given a mask (and a video's seconds)
        kw.update(attention_mask=torch.ones_like(ids),
                  video_second_per_grid=torch.tensor([float(sample.get("second_per_grid", 1.0))]))
    return model(input_ids=ids, position_ids=pos, **kw).logits


def check(path, dtype=torch.float32):
    """Our path (encode_pixels, encode_mels, splice, our positions, forward) vs transformers' own
    forward from pixels and audio features, for videos, an image and text alone; on Qwen2.5-Omni
    also audio alone and videos with their sound. transformers is given our positions (its
    Qwen2.5-VL rule is not the original: it resumes text after a video at start + max(h, w)), except
    on Qwen2.5-Omni, whose get_rope_index is the original rule: there it computes its own, so the
    logits compare the positions too. Returns max abs differences of the visual embeddings
    (DeepStack features included), the audio embeddings and the logits of each kind."""
    model, tok = load(path, dtype=dtype)
    omni = model.config.model_type == OMNI
    out = {"model": path, "family": model.config.model_type, "dtype": str(dtype).split(".")[-1]}
    cases = {"video": random_samples(model, ((4, 8, 8), (2, 4, 6))),
             "image": random_samples(model, ((1, 8, 12),), "image"), "text": [dict(kind=None)]}
    if omni:  # at 2 and 4 s a temporal group: one chunk of 2 s a group, and a group leaping two chunks
        cases["audio"] = [dict(kind="audio", **random_audio(3.1))]
        cases["video_audio"] = [dict(s, **random_audio(sec, seed=1)) for s, sec in zip(
            random_samples(model, ((4, 8, 8), (2, 4, 6)), second_per_grid=(2.0, 4.0)), (3.1, 7.3))]

    def record(key, a, b):
        out[key] = max(out.get(key, 0.0), (a.float() - b.float()).abs().max().item())

    with torch.no_grad():
        for case, samples in cases.items():
            for s in samples:
                ids, pos = prompt_of(tok, model.config, s, "Question: what happens here?")
                ids, pos = torch.tensor([ids]), pos[:, None]
                vis = aud = None
                if "pixel_values" in s:
                    vis = encode_pixels(model, s["pixel_values"], s["grid_thw"])
                    record("visual_embeds_max_abs_diff", vis, reference_features(model, s))
                if "input_features" in s:
                    aud = encode_mels(model, s["input_features"], s["feature_attention_mask"])
                    record("audio_embeds_max_abs_diff", aud, reference_audio(model, s))
                ours = model.lm_head(forward(model, splice(model, ids, vis, aud), pos))
                ref = reference_logits(model, ids, None if omni else pos, s)
                record(f"logits_{case}_max_abs_diff", ours, ref)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="compare our path with transformers' full forward")
    c.add_argument("--hf", default="tiny", help="local HF folder (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, "
                   "a Qwen2.5-Omni thinker or a whole Qwen2.5-Omni), "
                   f"or a tiny name ({', '.join(TINY)}); default tiny")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype")
    s = sub.add_parser("save", help="write the tiny model as a Hugging Face folder")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--seed", type=int, default=0, help="init seed")
    s.add_argument("--family", default="tiny", choices=list(TINY), help="which tiny model; default tiny")
    args = ap.parse_args()
    if args.cmd == "check":
        try:
            out = check(args.hf, getattr(torch, args.dtype))
        except (OSError, ValueError) as e:
            print(f"model.py check: {e}", file=sys.stderr)
            print(json.dumps({"error": str(e)}))
            sys.exit(1)
    else:
        model, tok = load(args.family, seed=args.seed)
        save(model, tok, args.out)
        out = {"saved": args.out, "params": sum(p.numel() for p in model.parameters())}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
