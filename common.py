"""
What every script shares: its settings, one-line errors, the device and dtype, and files written
atomically (checkpoints among them).

Settings work as in nanoGPT: a script lists them as module-level defaults, then calls configure(globals()),
and config files and --key=value flags override them, left to right:

    python train.py config/demo.py --batch_size=32 --compile=False

A value takes the type of its default: a bare --flag sets a bool setting to True, an int is accepted
where a float is expected, a str setting takes the text as written, and a setting whose default is None
takes any Python literal. Any mistake (an unknown key, a wrong type, a missing file) stops the script
with one line on stderr and exit code 2.
"""

import ast
import contextlib
import ctypes
import errno
import os
import pickle
import sys

import torch


def die(message, code=2):
    """Stop with one line naming the problem, never a traceback."""
    sys.stderr.write(f"error: {message}\n")  # one write: the lines of several ranks never run together
    sys.exit(code)


# ---- settings ----

def configure(namespace, argv=None):
    """Override a script's settings in namespace (its globals(): every lowercase name whose value is a bool,
    int, float, str or None) by the config files and --key=value flags in argv. Returns the settings and the
    set of keys the user gave (in a config file or a flag), whatever their values: those are what a resumed or
    fine-tuned run takes from the user rather than from its checkpoint."""
    defaults = {k: v for k, v in namespace.items()
                if k.islower() and not k.startswith("_") and (v is None or isinstance(v, (int, float, str)))}
    config, given = dict(defaults), set()
    for arg in sys.argv[1:] if argv is None else argv:
        if arg in ("-h", "--help"):
            print((namespace.get("__doc__") or "").strip() + "\n\nsettings (defaults):")
            for key, value in defaults.items():
                print(f"  --{key}={value!r}")
            sys.exit(0)
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if key not in defaults:
                die(f"unknown setting --{key} (see --help for the settings)")
            if not eq:
                if not isinstance(defaults[key], bool):
                    die(f"{arg}: give a value, --{key}=...")
                text = "True"  # a bare --flag switches a bool setting on
            config[key] = _convert(key, text, defaults[key], f"--{key}")
            given.add(key)
        else:
            if not os.path.isfile(arg):
                die(f"config file not found: {arg}")
            values = {}
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, "exec"), values)
            except Exception as e:  # a config file is user code: report its error in one line
                die(f"{arg}: {type(e).__name__}: {e}")
            for key, value in values.items():
                if key.startswith("_") or type(value).__name__ == "module":
                    continue
                if key not in defaults:
                    die(f"{arg}: unknown setting {key!r} (see --help for the settings)")
                config[key] = _convert(key, value, defaults[key], arg)
                given.add(key)
    namespace.update(config)
    return config, given


def _convert(key, value, default, source):
    """value (from a config file, or the text of a flag) converted to the type of default."""
    if isinstance(default, str):
        if isinstance(value, str):
            return value
    else:
        if isinstance(value, str):
            text = value
            if isinstance(default, bool) and text.lower() in ("true", "false"):
                text = text.capitalize()
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                die(f"{source}: {key}={text!r} is not a valid {type(default).__name__}")
        if default is None:
            return value
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
        elif isinstance(default, int):
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif isinstance(default, float):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    die(f"{source}: {key} must be a {type(default).__name__} (got {value!r})")


def check_settings(config, rules):
    """rules: (key, ok, allowed) triples; the first that is not ok stops the script, naming the key."""
    for key, ok, allowed in rules:
        if not ok:
            die(f"{key} must be {allowed} (got {config[key]!r})")


def model_config(args):
    """ModelConfig(**args), its own checks run before any work: a bad setting stops the script in one line."""
    from model import ModelConfig
    try:
        return ModelConfig(**args)
    except ValueError as e:
        die(str(e))


def int_list(key, text):
    """A setting that lists integers >= 1, written "1,4,16" (depths, batch sizes, swap counts)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        die(f"{key} must be comma-separated integers (got {text!r})")
    if any(v < 1 for v in values):
        die(f"{key} entries must be >= 1 (got {text!r})")
    return values


# ---- device and dtype ----

def setup_device(device):
    """"auto" is CUDA when present, else the CPU (MPS only when asked for). Returns (device, device_type);
    a device this machine does not have stops the script with one line."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device_type = torch.device(device).type
    except (RuntimeError, TypeError):
        device_type = None
    if device_type not in ("cpu", "cuda", "mps"):
        die(f"device must be auto, cpu, cuda, cuda:N or mps (got {device!r})")
    if device_type == "cuda" and torch.cuda.device_count() <= (torch.device(device).index or 0):
        die(f"device is {device} but {torch.cuda.device_count()} CUDA GPUs are available: use --device=cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        die("device is mps but MPS is not available here: use --device=cpu")
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device, device_type


def pick_dtype(dtype, device_type):
    """"auto" is bfloat16 on CUDA and float32 elsewhere (bfloat16 matmuls are slow on most CPUs)."""
    if dtype not in ("auto", "bfloat16", "float32"):
        die(f"dtype must be 'auto', 'bfloat16' or 'float32' (got {dtype!r})")
    return ("bfloat16" if device_type == "cuda" else "float32") if dtype == "auto" else dtype


def keep_freed_memory():
    """For training on CPU under glibc (Linux). By default glibc gives large freed blocks back to the system
    and the next step faults them in again page by page; fixed thresholds keep freed memory for reuse, as
    PyTorch's caching allocator does on CUDA (the process then keeps its peak resident). Returns whether the
    setting took (False off Linux and glibc)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform == "linux" else None
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30) and mallopt(M_TRIM_THRESHOLD, 1 << 30))


def resident_memory(peak=False):
    """This process's resident memory in bytes, or its peak (since it started, or since restart_peak_memory), from
    Linux's /proc; None elsewhere. ru_maxrss would not do: after fork and exec it still counts the parent's pages."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:" if peak else "VmRSS:"))
    except (OSError, StopIteration):
        return None


def restart_peak_memory():
    """Linux: the peak resident memory starts again from the present one (elsewhere nothing happens)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "wb") as f:
            f.write(b"5")


# ---- files ----

class WriteError(Exception):
    """A file could not be written (a full disk, say); the file that was at its path is untouched."""


class _CheckedFile:
    """A binary file whose write() raises on a short write, as a full disk may give, instead of returning a
    smaller count that a writer could miss."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        n, size = self.f.write(data), memoryview(data).nbytes
        if n is not None and n < size:
            raise OSError(errno.ENOSPC, f"{n} of {size} bytes written")
        return n

    def flush(self):
        self.f.flush()


def atomic_write(path, data):
    """Write data (bytes, or a function that writes to a binary file) to path atomically: a temp file, fsynced,
    renamed over the old one, so that a crash at any moment leaves the old file or the new one, whole. On an
    OSError (a full disk) the temp file is removed, the old file stays, and WriteError names the path and cause.
    Readers never open the temp file; the next write to path replaces one that a kill left behind."""
    tmp = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            data(_CheckedFile(f)) if callable(data) else _CheckedFile(f).write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = e  # torch.save reports a failed write as a RuntimeError raised while it handles the OSError
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise WriteError(f"could not write {path}: {cause.strerror or cause}") from None
        raise
    if os.name == "posix":  # the rename itself is made durable by syncing the directory (not on Windows)
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        with contextlib.suppress(OSError):
            os.fsync(fd)
        os.close(fd)


CHECKPOINT_FORMAT = 1  # raised when a checkpoint's contents change in a way older code cannot read


def save_checkpoint(payload, path):
    atomic_write(path, lambda f: torch.save(dict(payload, format=CHECKPOINT_FORMAT), f))


def read_checkpoint(path):
    """A checkpoint written by train.py, read as plain data: weights_only=True means nothing in the file
    can run code. Its tensors are mapped from the file (mmap): processes reading one checkpoint share its pages
    (not on Windows, which cannot replace a mapped file, as the next save does). Raises ValueError with one
    line that says why a file cannot be read: missing, unreadable, not a checkpoint, truncated, holding code,
    or from a newer format."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}: train one with train.py, or point --out_dir at one")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}; check its permissions") from None
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive
        raise ValueError(f"{path} is not a checkpoint: torch.save writes a zip archive, and this file is none")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=os.name != "nt")
    except pickle.UnpicklingError as e:  # weights_only refused an object that is not plain data
        found = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line][:1]
        raise ValueError(f"{path} holds objects other than tensors and plain data ({''.join(found) or 'pickled'}), "
                         "refused unread: loading them could run code") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:
        raise ValueError(f"{path} is truncated or damaged ({str(e).split('. ')[0]}): a copy or a disk cut it "
                         "short; use another checkpoint or train again") from None
    if not isinstance(checkpoint, dict) or not {"model", "model_args"} <= checkpoint.keys():
        raise ValueError(f"{path} is not a train.py checkpoint (no model or model_args)")
    if checkpoint.get("format", 1) > CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {checkpoint['format']}, newer than this code reads "
                         f"({CHECKPOINT_FORMAT}): update the code (git pull)")
    return checkpoint


def load_model(out_dir, device):
    """(model in eval mode, checkpoint) from out_dir/ckpt.pt; a ValueError of one line if that fails."""
    from model import ModelConfig, RecurrentGPT
    checkpoint = read_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    try:
        model = RecurrentGPT(ModelConfig(**checkpoint["model_args"]))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"the checkpoint in {out_dir} does not hold a valid model ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), checkpoint


def speculation_stats(blocks, draft_tokens):
    """(share of drafts accepted, new tokens per pass at num_steps) of generate() with draft_tokens, from the
    sizes of the blocks of tokens it streamed: the first came from the prompt's pass, each later one from a
    pass that checked min(draft_tokens, tokens still to come - 1) drafts and gave one token more than it kept."""
    total, n, drafted = sum(blocks), blocks[0], 0
    for b in blocks[1:]:
        drafted += min(draft_tokens, total - n - 1)
        n += b
    passes = len(blocks) - 1
    return (total - blocks[0] - passes) / max(drafted, 1), (total - blocks[0]) / max(passes, 1)


def training_memory(config, batch_size, seq_len, n_grad, checkpointing, dtype=torch.float32):
    """Bytes of a training step with float32 weights and AdamW, in one process: weights, gradients, AdamW's two
    moments, and activations, what autograd keeps for the backward pass. Those are counted in a forward on the
    meta device in the compute dtype (n_grad iterations carrying gradients); checkpointed, each of those keeps
    only its input state, and one iteration's activations are rebuilt at a time."""
    from model import RecurrentGPT
    with torch.device("meta"):
        model = RecurrentGPT(config).to(dtype)
    params = {id(p) for p in model.parameters()}
    idx = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")

    def saved(k):
        kept = {}

        def pack(t):
            base = t if t._base is None else t._base  # a view holds its base's memory, counted once
            if id(base) not in params:
                kept[id(base)] = base
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(idx, idx, num_steps=(0, k))
        return sum(t.nbytes for t in kept.values())

    per_iteration = saved(2) - saved(1)
    state = batch_size * seq_len * config.n_embd * dtype.itemsize
    kept = n_grad * state + per_iteration if checkpointing else n_grad * per_iteration
    n = model.get_num_params()
    return dict(weights=4 * n, gradients=4 * n, optimizer=8 * n, activations=saved(1) - per_iteration + kept)
