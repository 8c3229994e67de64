"""Files that survive crashes and strangers: atomic writes, locks, and loading torch files as plain data.

A file is written to a temporary name in its folder, flushed to disk, then renamed over the target, so a
crash leaves the old file or the new one, never half of one. A torch file is read with
torch.load(weights_only=True), which rebuilds tensors, numbers, strings, lists and dicts and refuses any
other pickled object: loading a file never runs code from it.
"""

import contextlib
import fcntl
import glob
import os
import pickle
import re
import socket
import tempfile
import time

import torch
import torch.nn as nn


class ArchiveError(ValueError):
    """A file that is not a loadable, plain-data captioner archive or checkpoint."""


# ---------------------------------------------------------------------------------------------------------
# ---- atomic writes ----

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


def remove_orphans(folder: str, name: str = ""):
    """Remove the temporary files that a killed atomic_write to folder/<name>... left. Call it only while
    holding the lock that covers those files, or another process's write in progress would go too."""
    for path in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}*.tmp-*")):
        with contextlib.suppress(OSError):
            os.remove(path)


# ---------------------------------------------------------------------------------------------------------
# ---- locks ----

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


# ---------------------------------------------------------------------------------------------------------
# ---- plain-data torch files ----

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


def safe_torch_load(path: str, allowed_globals=(), error=ArchiveError):
    """torch.load(weights_only=True), allowing only `allowed_globals` beyond tensors and containers, with
    errors (of class `error`) that name the file and the problem. Nothing in the file is ever executed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    unreadable = f"{path}: not a readable PyTorch file (truncated, corrupt or foreign)"
    refused_message = ("{path}: refused to load: the file needs pickled Python objects ({names}), which could "
                       "run arbitrary code; nothing in the file was executed")
    with torch.serialization.safe_globals(list(allowed_globals)):
        if allowed_globals:  # name every refused object up front, not just the first one the unpickler meets
            try:
                refused = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except ValueError:  # the legacy (pre-zip) format cannot be inspected; torch.load still refuses
                refused = []
            except Exception as e:  # a zip cut short (an interrupted download) fails here
                raise error(f"{unreadable}: {type(e).__name__}: {str(e)[:160]}") from None
            if refused:
                raise error(refused_message.format(path=path, names=", ".join(refused)))
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # the safe unpickler names the class or function it refused ("Unsupported global: GLOBAL x.y")
            refused = re.search(r"GLOBAL ([\w.]+)|global ([\w.]+)", str(e))
            if "Weights only load failed" not in str(e) or refused is None:
                raise error(unreadable) from None
            raise error(refused_message.format(path=path, names=refused[0])) from None
        except Exception as e:  # damaged input raises many kinds (RuntimeError, EOFError, KeyError, ...)
            raise error(f"{unreadable}: {type(e).__name__}: {str(e)[:200]}") from None


def tokenizer_to_data(tokenizer) -> dict:
    """A fast tokenizer as plain data (its JSON and EOS token), which safe loading rebuilds."""
    return {"json": tokenizer.backend_tokenizer.to_str(), "eos_token": tokenizer.eos_token}


def tokenizer_from_data(data: dict):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(data["json"]),
                                   eos_token=data["eos_token"], bos_token=data["eos_token"])


def load_versioned(path: str, expected_format: str, versions) -> dict:
    """A plain-data dict {"format": expected_format, "version": one of `versions`, ...} from `path`."""
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or obj.get("format") != expected_format:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise ArchiveError(f"{path}: not a {expected_format} file (found {found!r})")
    if obj.get("version") not in versions:
        raise ArchiveError(f"{path}: {expected_format} version {obj.get('version')!r} is not supported "
                           f"(this code reads versions {', '.join(map(str, versions))})")
    return obj


def check_writable(folder: str, flag: str):
    """Make `folder` if needed and check that files can be written in it, before any work: else one line
    naming the flag."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:  # PermissionError, or EROFS on a read-only file system
        raise SystemExit(f"error: {flag} {folder}: cannot write here ({e.strerror}); choose another "
                         f"{flag}") from None
