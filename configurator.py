"""
Settings for the scripts, as in nanoGPT: each script lists its settings as module-level defaults, then
config files and --key=value flags override them, left to right:

    python train.py config/demo.py --batch_size=32 --compile=False

A value takes the type of its default: a bare --flag sets a bool setting to True, an int is accepted
where a float is expected, a str setting takes the text as written, and a setting whose default is None
takes any Python literal. Any mistake (an unknown key, a wrong type, a missing file) stops the script
with one line on stderr and exit code 2. The scripts also share a few helpers from here: die, int_list,
and keep_freed_memory (a process setting for CPU training).
"""

import ast
import ctypes
import os
import sys


def die(message, code=2):
    """Stop with one line naming the problem, never a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def int_list(key, text):
    """A setting that lists integers >= 1, written "1,4,16" (depths, batch sizes, swap counts)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        die(f"{key} must be comma-separated integers (got {text!r})")
    if any(v < 1 for v in values):
        die(f"{key} entries must be >= 1 (got {text!r})")
    return values


def keep_freed_memory():
    """For training on CPU under glibc (Linux). By default glibc gives large freed blocks back to the system
    and the next step faults them in again page by page: 10-15% of a step at n_embd 256, as system time,
    and more on some models than on others. Fixed thresholds keep freed memory for reuse, as PyTorch's
    caching allocator does on CUDA; the process then keeps its peak resident. Returns whether the setting
    took (False off Linux and glibc)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform == "linux" else None
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30) and mallopt(M_TRIM_THRESHOLD, 1 << 30))


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


def configure(defaults, argv=None, usage=""):
    """Return a copy of defaults updated by the config files and --key=value flags in argv."""
    argv = sys.argv[1:] if argv is None else argv
    config = dict(defaults)
    for arg in argv:
        if arg in ("-h", "--help"):
            print(usage.strip() + "\n\nsettings (defaults):" if usage else "settings (defaults):")
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
        else:
            if not os.path.isfile(arg):
                die(f"config file not found: {arg}")
            namespace = {}
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, "exec"), namespace)
            except Exception as e:  # a config file is user code: report its error in one line
                die(f"{arg}: {type(e).__name__}: {e}")
            for key, value in namespace.items():
                if key.startswith("_") or type(value).__name__ == "module":
                    continue
                if key not in defaults:
                    die(f"{arg}: unknown setting {key!r} (see --help for the settings)")
                config[key] = _convert(key, value, defaults[key], arg)
    return config
