"""A trained model as a folder in the format the Hugging Face Hub shares, and reading it back from a folder or
a Hub id: no pickle anywhere, so loading never runs code from the files.

    MODEL/config.json         {"format", "version", "config" (the CaptionerConfig), "preprocessing",
                               "metadata" (what the run knows: epoch, validation figures, its command),
                               "tied" (weights stored once, under the first name)}
    MODEL/model.safetensors   the weights, each tensor once (GPT-2's lm_head is its token embedding)
    MODEL/tokenizer.json      the tokenizer, with tokenizer_config.json and special_tokens_map.json
    MODEL/README.md           a model card written from config.json

`hf upload USER/NAME MODEL` publishes it; Captioner.from_pretrained("USER/NAME") downloads it once into the
Hub's cache (huggingface_hub, installed with transformers).
"""

import json
import os
import shutil
import tempfile

from support.files import ArchiveError, atomic_write_text, load_versioned

FORMAT, VERSION = "captioner-model-folder", 1
FILES = ("config.json", "model.safetensors", "tokenizer.json")


def write_model_folder(folder: str, config: dict, state_dict: dict, tokenizer, preprocessing: dict,
                       metadata: dict):
    """Write the folder whole, then put it in place: a crash leaves the old folder or the new one. Only a
    model folder (or an empty or absent one) is replaced: anything else is refused, never deleted."""
    if os.path.isdir(folder) and os.listdir(folder) and not _is_model_folder(folder):
        raise ArchiveError(f"{folder}: not a model folder this program wrote; refusing to replace what it holds "
                           f"({', '.join(sorted(os.listdir(folder))[:4])}); choose another folder")
    state, tied, seen = {}, {}, {}
    for key, tensor in state_dict.items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                    tuple(tensor.stride()), tensor.dtype)
        if identity in seen:
            tied[key] = seen[identity]
        else:
            seen[identity], state[key] = key, tensor.contiguous()
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(folder)}.tmp-")
    try:
        from safetensors.torch import save_file
        save_file(state, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        description = {"format": FORMAT, "version": VERSION, "config": config, "preprocessing": preprocessing,
                       "metadata": metadata, "tied": tied, "eos_token": tokenizer.eos_token}
        atomic_write_text(os.path.join(staging, "config.json"), json.dumps(description, indent=1))
        atomic_write_text(os.path.join(staging, "README.md"), model_card(description))
        mask = os.umask(0o022)  # the only way to read the umask is to set it; put it back at once
        os.umask(mask)
        for name in os.listdir(staging):  # some writers (and mkdtemp) make private files: follow the umask
            os.chmod(os.path.join(staging, name), 0o666 & ~mask)
        os.chmod(staging, 0o777 & ~mask)
        replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _is_model_folder(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            description = json.load(f)
        return isinstance(description, dict) and description.get("format") == FORMAT
    except (OSError, ValueError):
        return False


def replace_folder(new: str, folder: str):
    """Move `new` to `folder`, which may exist: the old one goes aside first and is removed after."""
    old = None
    if os.path.exists(folder):
        old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(folder)),
                               prefix=f".{os.path.basename(folder)}.old-")
        os.rmdir(old)
        os.rename(folder, old)
    os.rename(new, folder)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def model_card(description: dict) -> str:
    config, metadata = description["config"], description["metadata"]
    figures = ", ".join(f"{k} {v:.4f}" for k, v in metadata.items() if k.startswith("val_") and
                        isinstance(v, float))
    lines = ["---", "library_name: pytorch", "pipeline_tag: image-to-text", "tags: [image-captioning]", "---",
             "", "# Image captioner", "",
             f"A GPT-2-family decoder ({config.get('language_model') or 'GPT-2'}, "
             f"{config['decoder'].get('n_layer')} layers, width {config['decoder'].get('n_embd')}) that "
             f"cross-attends to {1 + config['image_grid'] ** 2} image tokens of the frozen "
             f"`{config['vision_backbone']}` backbone.", "",
             f"- trained on: {metadata.get('data_dir', 'not recorded')}",
             f"- kept: epoch {metadata.get('epoch', '?')}, step {metadata.get('step', '?')}"
             + (f"; validation {figures}" if figures else ""),
             f"- command: `{metadata['command']}`" if metadata.get("command") else "- command: not recorded",
             "", "```python", "from captioner import Captioner",
             "cap = Captioner.from_pretrained(\"THIS-FOLDER-OR-HUB-ID\")", "cap(\"photo.jpg\", beam_size=3)",
             "```", ""]
    return "\n".join(lines)


def locate(folder_or_id: str) -> str:
    """A local folder as it is; anything else is a Hub id, downloaded once into the Hub's cache (only the
    files named in FILES and the tokenizer's). Errors say what to do, without a traceback."""
    if os.path.isdir(folder_or_id):
        return folder_or_id
    if os.path.exists(folder_or_id) or folder_or_id.count("/") > 1 or folder_or_id.startswith((".", "/")):
        raise ArchiveError(f"{folder_or_id}: not a model folder (config.json, model.safetensors, "
                           f"tokenizer.json) nor a Hub id like user/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
    try:
        return snapshot_download(folder_or_id, allow_patterns=[*FILES, "tokenizer_config.json",
                                                               "special_tokens_map.json", "README.md"])
    except HFValidationError as e:
        raise ArchiveError(f"{folder_or_id}: not a folder here, nor a valid Hub id ({e})") from None
    except RepositoryNotFoundError:
        raise ArchiveError(f"{folder_or_id}: no such model on the Hugging Face Hub (or it is private: "
                           f"`hf auth login`)") from None
    except LocalEntryNotFoundError:
        raise ArchiveError(f"{folder_or_id}: not downloaded yet, and the Hub cannot be reached (no network, "
                           f"or HF_HUB_OFFLINE=1); download it once with network, or give a local folder") \
            from None


def read_model_folder(folder: str) -> dict:
    """-> config.json's contents with "state_dict" (the tied weights restored under every name) and
    "tokenizer" (tokenizer.json's text and the EOS token), as plain data."""
    missing = [name for name in FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise ArchiveError(f"{folder}: not a model folder: no {', '.join(missing)}")
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            description = json.load(f)
        if not isinstance(description, dict):
            raise ValueError("config.json is not an object")
        if description.get("format") != FORMAT or description.get("version") != VERSION:
            raise ValueError(f"format {description.get('format')!r} version {description.get('version')!r}, "
                             f"not {FORMAT!r} version {VERSION}")
        if not all(isinstance(description.get(k), dict) for k in ("config", "preprocessing", "metadata", "tied")):
            raise ValueError("config.json lacks config, preprocessing, metadata or tied")
        from safetensors.torch import load_file
        state = load_file(os.path.join(folder, "model.safetensors"))
        for key, source in description["tied"].items():
            state[key] = state[source]
        with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
            tokenizer = {"json": f.read(), "eos_token": description["eos_token"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # safetensors' are ValueErrors
        raise ArchiveError(f"{folder}: damaged model folder: {type(e).__name__}: {str(e)[:300]}") from None
    return {**description, "state_dict": state, "tokenizer": tokenizer}


# ---- model.pt, as releases before model folders wrote it (read, never written) ----

ARCHIVE_FORMAT = "captioner-model"


def read_model_archive(path: str) -> dict:
    """A model.pt of an earlier release, as plain data (torch.load(weights_only=True)), with its figures
    under today's names (version 1 called the validation BLEU-4 "val_bleu4_coco")."""
    archive = load_versioned(path, ARCHIVE_FORMAT, (1, 2))
    if not all(isinstance(archive.get(key), dict) for key in ("config", "state_dict", "tokenizer",
                                                              "preprocessing", "metadata")):
        raise ArchiveError(f"{path}: damaged model archive: a part is missing")
    metadata = dict(archive["metadata"])
    if "val_bleu4_coco" in metadata:
        metadata["val_bleu4"] = metadata.pop("val_bleu4_coco")
    return {**archive, "metadata": metadata}
