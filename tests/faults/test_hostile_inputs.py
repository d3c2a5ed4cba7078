"""Malformed and hostile inputs: each is one error line (exit 2) before any large allocation, in bounded time and
memory; no code from an input model ever runs; a calibration text is streamed, never read whole.

Peak RSS is measured per command (a forked process, ``wait4``), as growth over the runner it was forked from.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from faults.harness import digest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Bounds for a refused input (a tiny model's whole eval grows ~80 MiB in ~2 s; a refusal comes before any model is
# built); the inputs they catch (10^9 layers, a 10^12-element tensor, a terabyte offset) would take gigabytes.
MAX_GROWTH_MIB = 64
MAX_SECONDS = 60
# A calibration stream is read up to layerprune.data.CALIBRATION_TEXT_CHARS (64 Mi characters) and no further.
STREAM_GROWTH_MIB = 1024
WEIGHTS = "model.safetensors"


def _config(edit):
    def mutate(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(edit)
        (folder / "config.json").write_text(json.dumps(config))
    return mutate


def _header(edit):
    """Rewrite the safetensors header (padded to 8 bytes), keeping the data as it is."""
    def mutate(folder: Path) -> None:
        raw = (folder / WEIGHTS).read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + length])
        edit(header)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
    return mutate


def _first(header, suffix):
    return next(name for name in header if name.endswith(suffix))


def _past_end(header):
    entry = header[_first(header, "q_proj.weight")]
    entry["data_offsets"] = [o + 10**12 for o in entry["data_offsets"]]


def _absurd_shape(header):
    header[_first(header, "q_proj.weight")]["shape"] = [10**6, 10**6]


def _drop_tensor(header):
    # kept in the file, gone from the header: the checkpoint lacks a tensor the config implies
    name = _first(header, "layers.1.mlp.up_proj.weight")
    header.pop(name)
    header.setdefault("__metadata__", {})["format"] = "pt"


def _header_longer_than_file(folder: Path) -> None:
    raw = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", 10**7) + raw[8:])


def _missing_shard(folder: Path) -> None:
    from safetensors import safe_open

    shard = "model-00001-of-00002.safetensors"
    (folder / WEIGHTS).rename(folder / shard)
    with safe_open(folder / shard, "pt") as f:
        names = list(f.keys())
    weight_map = {n: shard for n in names}
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _tensor_missing_from_its_shard(folder: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(folder / WEIGHTS, "pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    names = sorted(tensors)
    a, b = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({n: tensors[n] for n in names[:10]}, folder / a, metadata={"format": "pt"})
    save_file({n: tensors[n] for n in names[10:-1]}, folder / b, metadata={"format": "pt"})  # the last is lost
    (folder / WEIGHTS).unlink()
    weight_map = {n: (a if i < 10 else b) for i, n in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _infinite_weight(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / WEIGHTS)
    tensors["model.layers.2.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def _no_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()


# name -> (how the folder is spoiled, what the one error line says)
BROKEN_FOLDERS = {
    "layers-1e9": (_config({"num_hidden_layers": 10**9}), "num_hidden_layers 1000000000"),
    "hidden-zero": (_config({"hidden_size": 0}), "hidden_size is 0"),
    "hidden-negative": (_config({"hidden_size": -48}), "hidden_size is -48"),
    "heads-do-not-divide": (_config({"num_key_value_heads": 3}), "not a multiple of num_key_value_heads 3"),
    "head-dim-inconsistent": (_config({"head_dim": 16}), "q_proj.weight has shape [64, 48], the config gives [128, 48]"),
    "offsets-past-the-file": (_header(_past_end), "is truncated"),
    "absurd-shape": (_header(_absurd_shape), "for shape [1000000, 1000000]"),
    "tensor-missing": (_header(_drop_tensor), "has no tensor model.layers.1.mlp.up_proj.weight"),
    "header-longer-than-file": (_header_longer_than_file, "its header alone needs"),
    "shard-missing": (_missing_shard, "shard model-00002-of-00002.safetensors listed in"),
    "tensor-missing-from-shard": (_tensor_missing_from_its_shard, "is listed in"),
    "infinite-weight": (_infinite_weight, "tensor model.layers.2.mlp.down_proj.weight holds 1 NaN or infinite"),
    "no-tokenizer": (_no_tokenizer, "has no usable tokenizer"),
}


def _expect_refusal(result, says):
    assert result["exit"] == 2, result["log"][-3000:]
    assert len(result["error_lines"]) == 1 and says in result["error_lines"][0], result["log"][-3000:]
    assert "Traceback" not in result["log"]
    assert result["growth_mib"] < MAX_GROWTH_MIB and result["seconds"] < MAX_SECONDS, result


@pytest.mark.parametrize("name", list(BROKEN_FOLDERS))
@pytest.mark.parametrize("command", ["eval", "prune", "prune-sequential"])
def test_a_broken_checkpoint_is_one_line(runner, checkpoint, tmp_path, name, command):
    spoil, says = BROKEN_FOLDERS[name]
    folder = tmp_path / name
    shutil.copytree(checkpoint, folder)
    spoil(folder)
    before = digest(folder)
    if command == "eval":
        argv = ["eval", "--model", folder, "--max-tokens", "256", "--no-progress"]
    else:
        argv = ["prune", "--model", folder, "--ratio", "0.25", "--out", tmp_path / "out", "--calib-samples", "4",
                "--calib-seq-len", "32", "--no-progress", *(["--sequential"] if command == "prune-sequential" else [])]
    if name == "no-tokenizer" and command == "prune-sequential":
        says = "tokenizer"
    _expect_refusal(runner.one(argv), says)
    assert digest(folder) == before and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def gguf_file(runner, checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    result = runner.one(["export", "--model", checkpoint, "--out", path, "--outtype", "f32", "--no-progress"])
    assert result["exit"] == 0, result["log"][-3000:]
    return path


def _gguf_truncated_in_the_tensor_table(path: Path, out: Path) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    table = reader.tensors[len(reader.tensors) // 2].field.offset  # inside the tensor infos
    out.write_bytes(path.read_bytes()[:table + 5])


def _gguf_absurd_dimensions(path: Path, out: Path) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    dims = reader.tensors[0].field.parts[3]  # the first tensor's dimensions (uint64)
    at = dims.ctypes.data - reader.data.ctypes.data
    raw = bytearray(path.read_bytes())
    raw[at:at + dims.nbytes] = np.full(len(dims), 2**40, dtype="<u8").tobytes()
    out.write_bytes(bytes(raw))


@pytest.mark.parametrize("spoil", [_gguf_truncated_in_the_tensor_table, _gguf_absurd_dimensions],
                         ids=["truncated-tensor-table", "absurd-dimensions"])
def test_a_broken_gguf_is_one_line(runner, gguf_file, tmp_path, spoil):
    bad = tmp_path / "bad.gguf"
    spoil(gguf_file, bad)
    _expect_refusal(runner.one(["eval", "--model", bad, "--max-tokens", "256", "--no-progress"]), "bad.gguf")


def test_code_named_by_auto_map_never_runs(runner, checkpoint, tmp_path):
    folder = tmp_path / "remote"
    shutil.copytree(checkpoint, folder)
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
                          "AutoTokenizer": ["evil.EvilTokenizer", None]}
    (folder / "config.json").write_text(json.dumps(config))
    for argv in (["eval", "--model", folder, "--max-tokens", "256", "--no-progress"],
                 ["prune", "--model", folder, "--ratio", "0.25", "--out", tmp_path / "out", "--calib-samples", "4",
                  "--calib-seq-len", "32", "--no-progress"],
                 ["prune", "--model", folder, "--ratio", "0.25", "--out", tmp_path / "seq", "--calib-samples", "4",
                  "--calib-seq-len", "32", "--no-progress", "--sequential"]):
        result = runner.one(argv)
        assert result["exit"] == 0, result["log"][-3000:]
    assert not marker.exists()


def _calibrate_on(runner, checkpoint, text: Path, out: Path) -> dict:
    return runner.one(["prune", "--model", checkpoint, "--ratio", "0.25", "--out", out, "--calib-dataset", text,
                       "--calib-samples", "4", "--calib-seq-len", "32", "--no-progress"])


def test_an_empty_or_binary_calibration_file_is_one_line(runner, checkpoint, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _expect_refusal(_calibrate_on(runner, checkpoint, empty, tmp_path / "a"), "only 0 rows")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"GGUF\x03\x00\x00\x00" + os.urandom(4096))
    _expect_refusal(_calibrate_on(runner, checkpoint, binary, tmp_path / "b"), "binary.txt is not")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 cr\u00e8me ".encode("latin-1") * 100)
    _expect_refusal(_calibrate_on(runner, checkpoint, latin, tmp_path / "c"), "is not UTF-8 text")


def test_an_endless_calibration_stream_is_read_only_as_far_as_needed(runner, checkpoint, tmp_path, wikitext_dir):
    """A pipe that never ends (far larger than any memory): calibration stops reading at its limit."""
    fifo = tmp_path / "endless.txt"
    os.mkfifo(fifo)
    block = ((wikitext_dir / "valid.txt").read_text()[:200_000] * 8).encode()
    stop = threading.Event()
    written = [0]

    def feed() -> None:
        while not stop.is_set():
            try:
                with open(fifo, "wb") as pipe:
                    while not stop.is_set():
                        pipe.write(block)
                        written[0] += len(block)
            except (BrokenPipeError, OSError):
                continue

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    try:
        result = _calibrate_on(runner, checkpoint, fifo, tmp_path / "out")
    finally:
        stop.set()
        try:  # wake a writer waiting for a reader
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        except OSError:
            pass
        thread.join(timeout=30)
    assert result["exit"] == 0, result["log"][-3000:]
    assert result["growth_mib"] < STREAM_GROWTH_MIB and result["seconds"] < 4 * MAX_SECONDS, result
    assert written[0] > 64 * 2**20  # more than the limit was offered


# --- allocate --spec: any JSON gives a LayerpruneError, never another exception -------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True)
                     | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
                     max_leaves=25)
_layer = st.fixed_dictionaries({}, optional={k: _json | st.integers(-4, 64) for k in (
    "hidden", "num_q_heads", "num_kv_heads", "head_dim", "intermediate", "importance", "attn_curve", "mlp_curve")})
_spec = st.fixed_dictionaries({}, optional={"ratio": _json | st.floats(-1, 2), "layers": st.lists(_layer, max_size=4)
                                            | _json, "solver": _json, "protected": _json, "mlp_step": _json,
                                            "min_kv_groups": _json, "kv_cache_ratio": _json})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=_spec | _json)
def test_any_allocation_spec_is_solved_or_refused(spec, tmp_path):
    from layerprune.allocation import allocate, load_spec
    from layerprune.errors import LayerpruneError

    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    try:
        allocate(load_spec(path))
    except LayerpruneError:
        pass
