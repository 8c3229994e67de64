"""
An image captioner: a frozen vision backbone turns each image into a few image tokens, and a GPT-2-family
decoder writes the caption while cross-attending to them.

In reading order: the caption model and its loss, how a backbone's features become image tokens, decoding
(a batched beam search on the decoder's KV cache, and the sampler that self-critical training uses), saving
and loading a model (plain data only), the inference API (`Captioner`) and a command line:

    python captioner.py --checkpoint out/model --beam-size 3 a.jpg b.jpg

The model is defined here and nowhere else; data.py, evaluate.py, train.py and scst.py import it. The
machinery (backbone weights, image reading, safe file handling) lives in support/.
"""

import argparse
import inspect
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from support.backbones import VisionBackbone, load_backbone
from support.caption_files import caption_files, print_captions
from support.files import ArchiveError, cpu_state_dict, tokenizer_from_data
from support.model_folder import locate, read_model_archive, read_model_folder, write_model_folder
from support.images import load_image
from support.processes import autocast, default_device, embedding_precision, items_that_fit
from support.serve import serve

# ---------------------------------------------------------------------------------------------------------
# ---- the caption model ----

@dataclass
class CaptionerConfig:
    vision_backbone: str  # name passed to load_backbone()
    image_grid: int  # image tokens per image = 1 + image_grid**2 (0: the single global embedding)
    image_width: int  # D, width of the backbone's image tokens
    decoder: dict  # the GPT-2 config as a plain dict (GPT2Config.to_dict()), add_cross_attention=True
    eos_token_id: int  # ends every caption; GPT-2 also uses it as the start token
    language_model: str = ""  # where the decoder weights came from (a name or a directory), for the record
    image_dropout: float = 0.0  # dropout on the image memory while training (train.py --image-dropout)

    @property
    def num_image_tokens(self) -> int:
        return 1 + self.image_grid ** 2


# Short names -> their repositories on the Hugging Face hub.
LANGUAGE_MODELS = {"distilgpt2": "distilbert/distilgpt2", "gpt2": "openai-community/gpt2",
                   "gpt2-medium": "openai-community/gpt2-medium",
                   "gpt2-large": "openai-community/gpt2-large"}


class CaptionModel(nn.Module):
    """Image tokens (B, K, D) -> a learned projection (Linear + per-slot embedding + LayerNorm) to the
    decoder width C -> the memory that every decoder layer cross-attends to. The decoder is a GPT-2 LM."""

    def __init__(self, config: CaptionerConfig, decoder=None):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel
        self.config = config
        if decoder is None:
            decoder = GPT2LMHeadModel(GPT2Config.from_dict(config.decoder))
        if not decoder.config.add_cross_attention:
            raise ValueError("the decoder must be built with add_cross_attention=True")
        self.decoder = decoder
        # transformers 5.24 renamed decoding's `past_key_values` argument to `cache` (the old name warns
        # until 5.40); GPU machines run 5.17, which knows only the old name
        parameters = inspect.signature(type(decoder).forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        width = decoder.config.n_embd
        self.image_projection = nn.Linear(config.image_width, width)
        # a learned embedding per image-token slot, so the decoder can tell the global token from each
        # grid cell (cross-attention itself is order-blind)
        self.image_slot_embedding = nn.Parameter(torch.zeros(config.num_image_tokens, width))
        self.image_norm = nn.LayerNorm(width)
        self.image_dropout = nn.Dropout(config.image_dropout)  # the identity in eval mode, so when decoding

    @property
    def eos_token_id(self) -> int:
        return self.config.eos_token_id

    def encode_images(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """image_tokens (B, K, D) in any float dtype -> memory (B, K, C)."""
        if image_tokens.shape[1:] != (self.config.num_image_tokens, self.config.image_width):
            raise ValueError(f"expected image tokens of shape (B, {self.config.num_image_tokens}, "
                             f"{self.config.image_width}), got {tuple(image_tokens.shape)}")
        x = self.image_projection(image_tokens.to(self.image_projection.weight.dtype))
        return self.image_dropout(self.image_norm(x + self.image_slot_embedding))

    def forward(self, image_tokens: torch.Tensor, input_ids: torch.Tensor, label_positions=None, labels=None,
                label_smoothing: float = 0.0):
        """Teacher forcing: image_tokens (B, K, D), input_ids (B, T) right-padded -> (logits (B, T, V), None).
        With label_positions (N,), flat indices into the B*T positions (padding has none) -> logits (N, V)
        there only, and with labels (N,) too, their cross-entropy summed over the N tokens in fp32 (the
        training loop divides it by the tokens of the whole optimizer step). Only labelled positions reach
        the 50k-wide output layer, most of the cost; indices made on the CPU by the caller keep a GPU from
        waiting to learn N. label_smoothing eps: each target becomes (1 - eps) on the label + eps spread
        evenly over the vocabulary (Szegedy et al. 2016, "Rethinking the Inception architecture").
        Right padding needs no attention mask: causal attention never lets a real position see a later pad."""
        memory = self.encode_images(image_tokens)
        hidden = self.decoder.transformer(input_ids=input_ids, encoder_hidden_states=memory,
                                          use_cache=False).last_hidden_state  # (B, T, C)
        if label_positions is None:
            return self.decoder.lm_head(hidden), None
        logits = self.decoder.lm_head(hidden.flatten(0, 1).index_select(0, label_positions))  # (N, V)
        if labels is None:
            return logits, None
        return logits, F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=label_smoothing)

    def check_max_length(self, max_length: int):
        """Decoding writes token t at the decoder's position t: a caption cannot outgrow its positions."""
        positions = self.decoder.config.n_positions
        if max_length > positions:
            raise ValueError(f"--max-length {max_length}: this decoder reads at most {positions} tokens")

    def decode_step(self, input_ids: torch.Tensor, memory: torch.Tensor, cache):
        """One incremental step. input_ids (N, 1), memory (N, K, C), cache from the previous step or None
        -> logits (N, V) for the next token, and the updated cache."""
        output = self.decoder(input_ids=input_ids, encoder_hidden_states=memory,
                              use_cache=True, **{self.cache_argument: cache})
        # the output field is `cache` from transformers 5.24 on, `past_key_values` before
        return output.logits[:, -1], output["cache"] if "cache" in output else output["past_key_values"]


def labelled_positions(labels):
    """labels (B, T) -> flat indices (N,) of the positions with a label, and those labels (N,)."""
    positions = (labels.flatten() != -100).nonzero().squeeze(1)
    return positions, labels.flatten()[positions]


def build_model(language_model: str, vision_backbone: str, image_width: int, image_grid: int,
                dropout: float | None = None, image_dropout: float = 0.0):
    """A new caption model whose decoder starts from a pretrained GPT-2-family LM (a hub name or a local
    directory holding a saved model and tokenizer). The cross-attention layers start random. dropout, if
    given, replaces the LM's own on its embeddings, residuals and attention weights; image_dropout applies
    to the image memory. Returns (model, tokenizer)."""
    from transformers import AutoConfig, AutoTokenizer, GPT2LMHeadModel
    from transformers.utils import logging as transformers_logging
    source = LANGUAGE_MODELS.get(language_model, language_model)
    try:
        model_type = AutoConfig.from_pretrained(source).model_type
    except OSError as e:  # not a folder with a config.json, and not reachable on the hub
        raise ValueError(f"{language_model}: cannot load this language model: neither a local folder with "
                         f"a saved model nor reachable on the Hugging Face hub "
                         f"({str(e).splitlines()[0][:200]})") from None
    if model_type != "gpt2":
        raise ValueError(f"{language_model}: a GPT-2-family model is needed, got model type {model_type!r}")
    tokenizer = AutoTokenizer.from_pretrained(source)
    # transformers reports every cross-attention weight as "missing" (they are new, so that is expected);
    # quiet it for this one call and say it once, plainly
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        rates = {} if dropout is None else {"embd_pdrop": dropout, "resid_pdrop": dropout, "attn_pdrop": dropout}
        decoder = GPT2LMHeadModel.from_pretrained(source, add_cross_attention=True, **rates)
    finally:
        transformers_logging.set_verbosity(verbosity)
    print(f"decoder {language_model}: pretrained weights loaded; its {decoder.config.n_layer} "
          f"cross-attention layers start from random weights")
    decoder_config = json.loads(decoder.config.to_json_string(use_diff=False))
    config = CaptionerConfig(vision_backbone=vision_backbone, image_grid=image_grid, image_width=image_width,
                             decoder=decoder_config, eos_token_id=tokenizer.eos_token_id,
                             language_model=language_model, image_dropout=image_dropout)
    return CaptionModel(config, decoder), tokenizer


# ---------------------------------------------------------------------------------------------------------
# ---- image tokens ----
# A backbone (support/backbones.py) maps pixels (B, 3, H, W) to a global embedding (B, D) and a patch grid
# (B, D, h, w). It is frozen: only ever run under no_grad, and its tokens are cached on disk (data.py).

@torch.no_grad()
def image_tokens(backbone: VisionBackbone, pixels: torch.Tensor, grid: int) -> torch.Tensor:
    """pixels (B, 3, H, W) -> image tokens (B, 1 + grid*grid, D): the global embedding, then the patch grid
    average-pooled to grid x grid (row-major). grid=0 gives the single global embedding (the original's)."""
    global_embedding, patches = backbone.features(pixels)  # (B, D), (B, D, h, w)
    tokens = [global_embedding[:, None, :]]  # (B, 1, D)
    if grid > min(patches.shape[-2:]):  # pooling would repeat patches, not summarise them
        raise ValueError(f"--image-grid {grid} is finer than {backbone.name}'s {patches.shape[-2]} x "
                         f"{patches.shape[-1]} patch grid")
    if grid > 0:
        pooled = F.adaptive_avg_pool2d(patches.float(), grid)  # (B, D, grid, grid)
        tokens.append(pooled.flatten(2).transpose(1, 2).to(global_embedding.dtype))  # (B, grid*grid, D)
    return torch.cat(tokens, dim=1)


# ---------------------------------------------------------------------------------------------------------
# ---- decoding ----

@torch.no_grad()
def beam_search(model: CaptionModel, image_tokens: torch.Tensor, beam_size: int = 1, max_length: int = 30,
                length_penalty: float = 1.0):
    """Batched beam search: all images x beams go through the decoder as one batch per step, with the
    decoder's KV cache reordered by each surviving beam's parent.

    image_tokens: (B, K, D) backbone tokens.
    max_length: the most tokens a caption may have, its EOS included; the last step may only emit EOS.
    Score of a finished caption = (sum of its token log-probabilities, EOS included) / length**length_penalty.
    An image is done once it holds `beam_size` finished captions (as in Whisper); so beam_size=1 is
    exactly greedy decoding.
    Returns ids (B, L) int64 (each row ends with EOS and is padded with EOS; L <= max_length) and
    scores (B,) float32, both on the input's device. Does not change the model's train/eval mode.
    """
    if beam_size < 1 or max_length < 1:
        raise ValueError(f"beam_size and max_length must be at least 1, not {beam_size} and {max_length}")
    model.check_max_length(max_length)
    device = image_tokens.device
    B, W, L, eos = image_tokens.shape[0], beam_size, max_length, model.eos_token_id
    memory = model.encode_images(image_tokens).repeat_interleave(W, dim=0)  # (B*W, K, C), beams adjacent

    generated = torch.zeros(B * W, 0, dtype=torch.long, device=device)  # live beams' tokens so far
    next_input = torch.full((B * W, 1), eos, dtype=torch.long, device=device)  # GPT-2 starts from EOS
    live_scores = torch.zeros(B, W, device=device)
    live_scores[:, 1:] = -math.inf  # all beams start identical: let only the first one expand at step 0
    finished_ids = torch.full((B, W, L), eos, dtype=torch.long, device=device)
    finished_scores = torch.full((B, W), -math.inf, device=device)  # length-penalised; -inf = empty slot
    done = torch.zeros(B, dtype=torch.bool, device=device)
    rank = torch.arange(2 * W, device=device)
    image_offset = (torch.arange(B, device=device) * W)[:, None]  # (B, 1) row of each image's first beam
    cache = None

    for step in range(L):
        logits, cache = model.decode_step(next_input, memory, cache)
        logprobs = F.log_softmax(logits.float(), dim=-1)  # (B*W, V)
        V = logprobs.shape[-1]
        if step == L - 1:  # out of room: only EOS may follow, with its real log-probability
            eos_logprob = logprobs[:, eos].clone()
            logprobs.fill_(-math.inf)
            logprobs[:, eos] = eos_logprob
        candidates = (live_scores[:, :, None] + logprobs.view(B, W, V)).view(B, W * V)  # (B, W*V)
        # 2W candidates: at most W of them end in EOS (one per parent), so W live beams always remain
        top_scores, top_index = candidates.topk(2 * W, dim=1)  # (B, 2W)
        parent, token = top_index // V, top_index % V  # (B, 2W) each, integer math
        ends = token == eos

        # finished: EOS candidates ranked among the top W, for images not already done
        new_final = ends & (rank < W) & ~done[:, None]  # (B, 2W)
        final_scores = torch.where(new_final, top_scores / float(step + 1) ** length_penalty,
                                   torch.full_like(top_scores, -math.inf))
        final_ids = torch.full((B, 2 * W, L), eos, dtype=torch.long, device=device)
        final_ids[:, :, :step] = generated.view(B, W, step).gather(
            1, parent[:, :, None].expand(B, 2 * W, step))  # (B, 2W, step), EOS already at position step
        pool_scores = torch.cat([finished_scores, final_scores], dim=1)  # (B, 3W)
        finished_scores, keep = pool_scores.topk(W, dim=1)  # (B, W)
        finished_ids = torch.cat([finished_ids, final_ids], dim=1).gather(1, keep[:, :, None].expand(B, W, L))
        done = done | (finished_scores > -math.inf).all(dim=1)
        # One host sync per step to stop early once every image is done; cheaper than running to L.
        if step == L - 1 or bool(done.all()):
            break

        # live: the best W candidates that do not end in EOS, kept in rank order
        order = (rank + ends * 2 * W).argsort(dim=1)[:, :W]  # (B, W)
        live_scores = top_scores.gather(1, order)
        beam_parent = (image_offset + parent.gather(1, order)).view(B * W)  # (B*W,) flat parent row
        next_input = token.gather(1, order).view(B * W, 1)
        generated = torch.cat([generated[beam_parent], next_input], dim=1)  # (B*W, step+1)
        cache.reorder_cache(beam_parent)

    best_scores, best = finished_scores.max(dim=1)  # (B,)
    best_ids = finished_ids[torch.arange(B, device=device), best]  # (B, L)
    lengths = (best_ids != eos).sum(dim=1) + 1  # tokens before EOS cannot be EOS, so this counts EOS once
    return best_ids[:, : int(lengths.max())], best_scores


@torch.no_grad()
def sample_captions(model: CaptionModel, image_tokens: torch.Tensor, samples_per_image: int = 1,
                    max_length: int = 30, temperature: float = 1.0, generator: torch.Generator | None = None):
    """Batched sampling (for self-critical training): S = samples_per_image captions per image, all images x S
    rows through the decoder as one batch per step, with its KV cache; a row leaves the batch once its caption
    has ended. It runs without autograd: caption_logprobs gives the differentiable log-probabilities in one
    parallel pass, which keeps no KV cache per step for the backward pass (bench/scst_step.py measures that
    against back-propagating through this loop). So scst.py uses the ids only; the log-probabilities summed
    here are for that benchmark and for the tests, which check the two computations against each other.

    image_tokens: (B, K, D) backbone tokens.
    max_length: the most tokens a caption may have, its EOS included. A caption still running at the last
    position gets EOS there without a draw, so that EOS adds 0 to its log-probability.
    temperature: tokens are drawn from softmax(logits / temperature), and the log-probabilities returned are
    of that tempered distribution: the one sampled from, which is what the policy gradient needs.
    generator: a CPU torch.Generator, or None for the global one. All randomness is drawn up front: one
    uniform per row and position, (B*S, max_length) in float64, row after row (the CPU generator fills a
    tensor element by element); a row picks its token by inverse CDF. So a row's caption depends on its
    image and its own uniforms only: B images in one call give what B calls of one image each give with the
    same generator, in order, and the draws are the same on every device.
    Returns ids (B*S, L) int64 (row b*S + s is sample s of image b; each row ends with EOS and is padded with
    EOS; L <= max_length) and logprobs (B*S,) float32: each caption's summed token log-probabilities, EOS
    included. Does not change the model's train/eval mode; in train mode, dropout draws its own masks.
    """
    if samples_per_image < 1 or max_length < 1 or not temperature > 0:
        raise ValueError(f"samples_per_image and max_length must be at least 1 and temperature > 0, not "
                         f"{samples_per_image}, {max_length} and {temperature}")
    model.check_max_length(max_length)
    device = image_tokens.device
    N, L, eos = image_tokens.shape[0] * samples_per_image, max_length, model.eos_token_id
    uniforms = torch.rand(N, L, generator=generator, dtype=torch.float64).to(device)  # (N, L)
    memory = model.encode_images(image_tokens).repeat_interleave(samples_per_image, dim=0)  # (N, K, C)
    ids = torch.full((N, L), eos, dtype=torch.long, device=device)  # EOS after each caption: the padding
    summed = torch.zeros(N, device=device)
    live = torch.arange(N, device=device)  # (n,) the rows still writing; only they run through the decoder
    next_input = torch.full((N, 1), eos, dtype=torch.long, device=device)  # GPT-2 starts from EOS
    cache, length = None, L
    for step in range(L - 1):  # the last position may only hold EOS: nothing to draw there
        logits, cache = model.decode_step(next_input, memory, cache)
        logits = logits.float() / temperature if temperature != 1 else logits.float()
        probs = F.softmax(logits, dim=-1)  # (n, V)
        # summed in float64, so that rounding in a 50k-term running sum does not move the tokens' boundaries
        cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # (n, V)
        token = torch.searchsorted(cdf, uniforms[live, step:step + 1] * cdf[:, -1:], right=True)  # (n, 1)
        token = token.clamp(max=cdf.shape[1] - 1)
        ids[live, step] = token.squeeze(1)
        # a token of probability 0 in float32 lies between two equal CDF values, so it is never drawn
        summed.index_add_(0, live, probs.gather(1, token).squeeze(1).log())
        # Finished rows leave the batch (and the KV cache), so the decoder's work follows the tokens
        # written, not rows x the longest caption. One host sync per step, to learn which rows remain.
        keep = (token.squeeze(1) != eos).nonzero().squeeze(1)  # (n',) positions among the live rows
        if len(keep) == 0:
            length = step + 1
            break
        if len(keep) < len(live):
            live, memory, token = live[keep], memory[keep], token[keep]
            cache.reorder_cache(keep)
        next_input = token
    return ids[:, :length], summed


def caption_logprobs(model: CaptionModel, image_tokens: torch.Tensor, ids: torch.Tensor, max_length: int,
                     temperature: float = 1.0) -> torch.Tensor:
    """Teacher forcing over sampled captions: the log-probabilities that sample_captions returns, computed
    again in one parallel pass WITH autograd (self-critical training's gradient flows through them).

    image_tokens: (N, K, D), the image of each caption (sample_captions' images, repeated S times each).
    ids: (N, L) from sample_captions with this max_length: each row's first EOS ends its caption. An EOS at
    position max_length - 1 was forced, not drawn, and adds 0.
    Returns (N,) float32: each caption's summed token log-probabilities under softmax(logits / temperature),
    its words and its drawn EOS. Only those tokens reach the 50k-wide output layer, not the EOS padding.
    """
    N, L, eos = *ids.shape, model.eos_token_id
    first_eos = (ids == eos).int().argmax(dim=1)  # (N,) every row holds an EOS
    drawn = first_eos + (first_eos < max_length - 1).long()  # (N,) tokens drawn per row
    position = torch.arange(L, device=ids.device)
    labels = torch.where(position[None] < drawn[:, None], ids, -100)  # (N, L)
    # the inputs: the caption shifted right by one, behind the EOS that GPT-2 starts from
    input_ids = torch.cat([torch.full((N, 1), eos, device=ids.device), ids[:, :-1]], dim=1)  # (N, L)
    positions, targets = labelled_positions(labels)  # (n,) flat indices into N*L, and their tokens
    logits, _ = model(image_tokens, input_ids, positions)  # (n, V)
    logits = logits.float() / temperature if temperature != 1 else logits.float()  # (n, V): no copy at 1
    token_logprobs = -F.cross_entropy(logits, targets, reduction="none")  # (n,)
    return torch.zeros(N, device=ids.device).index_add(0, positions // L, token_logprobs)


def ids_to_text(tokenizer, ids: torch.Tensor) -> list[str]:
    """ids (B, L) from beam_search -> one caption per row, cut at the first EOS."""
    eos = tokenizer.eos_token_id
    rows = [row[: row.index(eos)] if eos in row else row for row in ids.tolist()]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]


def images_per_batch(model: CaptionModel, beam_size: int, max_length: int, wanted: int, device) -> int:
    """How many images beam_search may decode at once: at most `wanted`, as many as fit in half of the memory
    free on `device`. Per image and beam, a step holds about four float32 rows of the vocabulary (logits,
    log-probabilities, candidates, top-k), the KV cache and the captions so far: 0.8 GB an image at beam 1000
    with GPT-2's 50k tokens. A beam size that cannot decode even one image is refused, with the figures."""
    config = model.decoder.config
    per_beam = (16 * config.vocab_size + 8 * config.n_layer * config.n_embd * (max_length +
                model.config.num_image_tokens) + 40 * max_length)  # bytes
    return items_that_fit(per_beam * beam_size, wanted, device, f"--beam-size {beam_size}: decoding one image",
                          f"{beam_size} beams x a {config.vocab_size:,}-token vocabulary", "lower --beam-size")


@torch.no_grad()
def caption_image_tokens(model, tokenizer, image_tokens, beam_size: int = 1, device="cpu",
                         batch_size: int = 128, max_length: int = 30,
                         length_penalty: float = 1.0) -> list[str]:
    """image_tokens (N, K, D), an array, memmap or tensor, in order -> N captions, decoded in batches of at
    most batch_size images (fewer when memory asks for it, said once), in the given order (no shuffling).
    The caller sets model.eval(). Running out of memory anyway ends in a ValueError that says what to lower."""
    fits = images_per_batch(model, beam_size, max_length, batch_size, device)
    if fits < min(batch_size, len(image_tokens)):
        print(f"note: decoding {fits} images at a time, not {batch_size}: that is what fits in memory at "
              f"beam size {beam_size}", file=sys.stderr)
    captions = []
    try:
        for start in range(0, len(image_tokens), fits):
            batch = image_tokens[start:start + fits]
            batch = batch if torch.is_tensor(batch) else torch.from_numpy(np.array(batch))  # (b, K, D), a copy
            ids, _ = beam_search(model, batch.to(device), beam_size, max_length, length_penalty)
            captions.extend(ids_to_text(tokenizer, ids))
    except RuntimeError as e:  # torch.OutOfMemoryError on a GPU, "can't allocate memory" on a CPU
        if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
            raise
        raise ValueError(f"out of memory while decoding {fits} images at beam size {beam_size} on {device}; "
                         f"lower --beam-size or --batch-size") from None
    return captions


# ---------------------------------------------------------------------------------------------------------
# ---- saving and loading a model ----
# A folder in the Hugging Face Hub's format (support/model_folder.py): config.json, model.safetensors and the
# tokenizer's files, plain data only, so loading never runs code from them. model.pt files of earlier releases
# are still read (torch.load(weights_only=True)), never written.

def save_model(folder: str, model: CaptionModel, tokenizer, preprocessing: dict, metadata: dict | None = None):
    """Write the model folder: its config, weights (tied ones once), tokenizer, preprocessing and a card."""
    write_model_folder(folder, asdict(model.config), cpu_state_dict(model), tokenizer, preprocessing,
                       metadata or {})


def model_from_data(config: dict, state_dict: dict, tokenizer: dict, path: str, what="model archive"):
    """A model (CPU, eval mode) and its tokenizer from what an archive or a checkpoint stores; the weights'
    shapes are checked against the config first, on the meta device, so a config that asks for a huge model
    costs no memory. Anything wrong raises ArchiveError naming `path`."""
    try:
        config = CaptionerConfig(**config)
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in CaptionModel(config).state_dict().items()}
        stored = {k: tuple(v.shape) for k, v in state_dict.items()}
        if shapes != stored:
            wrong = sorted(set(shapes.items()) ^ set(stored.items()))[:3]
            raise ValueError(f"its weights do not fit its config (first differences: {wrong})")
        model = CaptionModel(config)
        model.load_state_dict(state_dict, strict=True)
        return model.eval(), tokenizer_from_data(tokenizer)
    except Exception as e:  # missing keys, wrong shapes, a tokenizer that does not parse
        raise ArchiveError(f"{path}: damaged {what}: {type(e).__name__}: {str(e)[:300]}") from None


def load_model(path: str):
    """A model folder, a Hub id (user/name) or an older model.pt -> (model, CPU, eval mode; tokenizer; its
    description: "config", "preprocessing", "metadata")."""
    archive = read_model_archive(path) if os.path.isfile(path) else read_model_folder(locate(path))
    model, tokenizer = model_from_data(archive["config"], archive["state_dict"], archive["tokenizer"], path)
    return model, tokenizer, archive


# ---------------------------------------------------------------------------------------------------------
# ---- inference API ----

class Captioner(nn.Module):
    """Images in, captions out.

        cap = Captioner.from_pretrained("out/model").to(device)    # a folder, a Hub id, or a model.pt
        cap("photo.jpg", beam_size=3)            # -> str
        cap([img1, img2], beam_size=3)           # -> list[str], decoded as one batch
        tokens = cap.encode([img1, img2])        # (B, K, D) image tokens, what beam_search takes
    """

    def __init__(self, backbone: VisionBackbone, model: CaptionModel, tokenizer,
                 embedding_precision: str = "32"):
        super().__init__()
        self.backbone, self.model, self.tokenizer = backbone, model, tokenizer
        # the backbone runs as it did for the training images ("16": fp16 autocast on CUDA; fp32 elsewhere)
        self.embedding_precision = embedding_precision

    @classmethod
    def from_pretrained(cls, path: str) -> "Captioner":
        """A model (a folder, a Hub id, a model.pt) with the backbone it names, in eval mode, on the CPU."""
        return cls.around(*load_model(path), path)

    load = from_pretrained

    def save_pretrained(self, folder: str):
        """Write the model folder that from_pretrained reads (and `hf upload` publishes)."""
        save_model(folder, self.model, self.tokenizer, self.backbone.preprocessing, self.metadata)

    @classmethod
    def around(cls, model: CaptionModel, tokenizer, archive: dict, path: str) -> "Captioner":
        """A loaded model (load_model's three results) with the backbone it names."""
        backbone = load_backbone(model.config.vision_backbone)
        if backbone.preprocessing != archive["preprocessing"] or backbone.width != model.config.image_width:
            raise ArchiveError(f"{path}: the backbone {backbone.name} now preprocesses images as "
                               f"{backbone.preprocessing} with width {backbone.width}, but the model was "
                               f"trained on {archive['preprocessing']} with width {model.config.image_width}")
        captioner = cls(backbone, model, tokenizer, archive["metadata"].get("embedding_precision", "32"))
        captioner.metadata = archive["metadata"]
        return captioner.eval()

    @property
    def device(self) -> torch.device:
        return self.model.image_projection.weight.device

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """A list of paths or PIL images -> image tokens (B, K, D), float32: exactly the tokens that training
        cached for the same image (same precision, rounded to float16 as the cache stores them)."""
        return self.encode_pixels(torch.stack([self.backbone.preprocess(image) for image in images]))

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (B, 3, S, S), as support/images.py's ImageFiles gives them -> (B, K, D)."""
        pixels = pixels.to(self.device)
        with autocast(self.device, embedding_precision(self.device, self.embedding_precision)):
            tokens = image_tokens(self.backbone, pixels, self.model.config.image_grid)
        return tokens.float().half().float()

    @torch.no_grad()
    def forward(self, images, beam_size: int = 1, max_length: int = 30, length_penalty: float = 1.0):
        single = not isinstance(images, (list, tuple))
        self.model.check_max_length(max_length)  # before the backbone runs
        texts = self.caption_tokens(self.encode([images] if single else images), beam_size, max_length,
                                    length_penalty)
        return texts[0] if single else texts

    def caption_tokens(self, tokens, beam_size: int = 1, max_length: int = 30, length_penalty: float = 1.0):
        """Image tokens (B, K, D) -> B captions, in batches that fit in memory."""
        return caption_image_tokens(self.model, self.tokenizer, tokens, beam_size, self.device, len(tokens),
                                    max_length, length_penalty)


# ---------------------------------------------------------------------------------------------------------
# ---- command line ----

def get_args_parser():
    parser = argparse.ArgumentParser("Caption images with a trained model", add_help=True)
    parser.add_argument("images", nargs="*", help="image files (any format and mode PIL reads), or folders")
    parser.add_argument("--checkpoint", default="out/model",
                        help="the model: train.py's OUT/model folder, a Hub id, or an earlier release's model.pt")
    parser.add_argument("--convert", metavar="FOLDER", help="write --checkpoint as a model folder, and stop")
    parser.add_argument("--beam-size", type=int, default=1, help="beams per image; 1 = greedy")
    parser.add_argument("--max-length", type=int, default=30, help="most tokens per caption, EOS included")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="final score = sum of log-probs / length**length_penalty")
    parser.add_argument("--batch-size", type=int, default=32, help="images decoded together")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    parser.add_argument("--output", default=None,
                        help="write path and caption per image to this file as it goes, JSON lines or CSV by "
                             "its extension; a rerun skips what it holds (default with a folder: "
                             "captions.jsonl; without: print them)")
    parser.add_argument("--serve", action="store_true", help="serve a page to caption photos in a browser")
    parser.add_argument("--host", default="127.0.0.1", help="--serve's address (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="--serve's port (0: any free one)")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="image reading workers for --output (default: CPU cores, at most 8)")
    return parser


def main(args):
    if min(args.beam_size, args.max_length, args.batch_size, args.num_workers + 1) < 1 or not (
            args.images or args.convert or args.serve):
        raise SystemExit("error: --beam-size, --max-length and --batch-size must be at least 1; name images")
    device = args.device or default_device()
    model, tokenizer, archive = load_model(args.checkpoint)
    if args.convert:  # an earlier release's model.pt (or any model) as a model folder
        save_model(args.convert, model, tokenizer, archive["preprocessing"], archive["metadata"])
        return print(f"wrote {args.convert}: {', '.join(sorted(os.listdir(args.convert)))}")
    model.check_max_length(args.max_length)  # both before loading the backbone or reading an image
    images_per_batch(model, args.beam_size, args.max_length, 1, device)
    captioner = Captioner.around(model, tokenizer, archive, args.checkpoint).to(device)

    def caption_images(images, beam_size=args.beam_size):
        return captioner(images, beam_size, args.max_length, args.length_penalty)
    if args.serve:  # a page to try it on, one photo at a time
        return serve(lambda upload, beam: caption_images(load_image(upload), beam), args.host, args.port)
    if args.output or any(os.path.isdir(path) for path in args.images):  # into a file, resumably
        return caption_files(args.images, args.output or "captions.jsonl", captioner.backbone.preprocessing,
                             lambda pixels: captioner.caption_tokens(captioner.encode_pixels(pixels),
                                                                     args.beam_size, args.max_length,
                                                                     args.length_penalty),
                             args.batch_size, args.num_workers)
    print_captions(args.images, caption_images, args.batch_size)  # path<TAB>caption on stdout


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        main(args)
    except (ArchiveError, OSError, ValueError) as e:  # OSError: no network for a backbone's weights, say
        raise SystemExit(f"error: {e}")
