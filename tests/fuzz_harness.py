"""Seeded mutations of GGUF and safetensors models, run in one worker process with a per-case watchdog.

Shared by tests/test_fuzz_loaders.py (a few hundred cases) and scripts/fuzz_loaders.py (the long run).

A case is (target, index): the mutation is a pure function of the seed, the target's bytes and the
index, so any case can be replayed. Every case must end in
  * "error"  : an MlxedgeError with a one-line message, or
  * "loaded" : a load whose logits on a few tokens are finite;
anything else is a finding: "nonfinite" (loaded, logits NaN/inf), "unexpected" (another exception
class), "multiline" (an MlxedgeError spanning lines), "crash" (the worker died) or "hang" (the
watchdog fired). Mutations marked structural (offsets, types, sizes, counts, truncation) must never
load at all.

The worker (`python fuzz_harness.py worker SPEC.json`) prints one JSON line per finished case; the
parent (`run_cases`) restarts it after a crash or hang, recording the case it was on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
GGUF_TYPES = [0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 20, 24, 30, 4, 5, 99, 2**31]  # valid, removed, unknown
SAME_SIZE_FLOATS = {frozenset((1, 30))}  # F16 <-> BF16: same bytes per element, undetectable by structure


# ------------------------------------------------------------------------------------------ GGUF layout

@dataclass
class Field:
    kind: str  # version, n_tensors, n_kv, key_len, kv_type, kv_value, str_len, arr_count, t_name_len, t_ndims,
    #            t_dim, t_type, t_offset
    pos: int
    size: int
    value: int = 0
    extra: int = 0  # t_type: the tensor index; kv_value: the GGUF value type


def gguf_fields(data: bytes) -> Tuple[List[Field], int]:
    """Positions of every header field of a valid little-endian GGUF, and where its tensor table ends.

    Written from the GGUF spec independently of mlxedge's reader."""
    fields: List[Field] = []
    pos = 4

    def u(fmt, kind, extra=0):
        nonlocal pos
        size = struct.calcsize(fmt)
        value = struct.unpack_from(fmt, data, pos)[0]
        fields.append(Field(kind, pos, size, value, extra))
        pos += size
        return value

    scal = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}

    def value(vtype, kind_len):
        nonlocal pos
        if vtype == 8:
            n = u("<Q", kind_len)
            pos += n
        elif vtype == 9:
            itype = u("<I", "arr_type")
            count = u("<Q", "arr_count")
            for _ in range(count):
                value(itype, "arr_str_len")
        else:
            fmt = scal[vtype]
            if vtype in (6, 12):  # floats: record as raw integer bits
                size = struct.calcsize(fmt)
                fields.append(Field("kv_value", pos, size, int.from_bytes(data[pos:pos + size], "little"), vtype))
                pos += size
            else:
                u(fmt.replace("b", "B").replace("h", "H").replace("i", "I").replace("q", "Q"), "kv_value", vtype)

    u("<I", "version")
    n_tensors = u("<Q", "n_tensors")
    n_kv = u("<Q", "n_kv")
    for _ in range(n_kv):
        n = u("<Q", "key_len")
        pos += n
        vtype = u("<I", "kv_type")
        value(vtype, "str_len")
    for i in range(n_tensors):
        n = u("<Q", "t_name_len")
        pos += n
        nd = u("<I", "t_ndims")
        for _ in range(nd):
            u("<Q", "t_dim", i)
        u("<I", "t_type", i)
        u("<Q", "t_offset", i)
    return fields, pos


STRUCTURAL_GGUF = {"version", "n_tensors", "t_ndims", "t_dim", "t_type", "t_offset", "truncate", "t_name_len"}


def _interesting(rng, old: int, size: int) -> int:
    top = (1 << (8 * size)) - 1
    choices = [0, 1, old + 1, old - 1, old * 2, old // 2, top, top - 1, top - 31, 1 << (8 * size - 1),
               2**31 - 1, 2**31, 2**32, 10**9, int(rng.integers(0, 1 << min(8 * size, 62)))]
    return int(choices[int(rng.integers(len(choices)))]) & top


def mutate_gguf(data: bytes, fields: List[Field], header_end: int, rng) -> Tuple[bytes, str]:
    """One seeded mutation of a GGUF file; returns (bytes, kind)."""
    buf = bytearray(data)
    kind = ["flip", "data_flip", "field", "field", "field", "t_type", "t_offset", "t_dim", "truncate",
            "kv_value"][int(rng.integers(10))]
    if kind == "flip":
        for _ in range(int(rng.integers(1, 4))):
            buf[int(rng.integers(4, header_end))] ^= int(rng.integers(1, 256))
        return bytes(buf), kind
    if kind == "data_flip":
        buf[int(rng.integers(header_end, len(buf)))] ^= int(rng.integers(1, 256))
        return bytes(buf), kind
    if kind == "truncate":
        return bytes(buf[:int(rng.integers(0, len(buf) - 64))]), kind
    pool = [f for f in fields if f.kind == kind] if kind != "field" else \
        [f for f in fields if f.kind in ("version", "n_tensors", "n_kv", "key_len", "kv_type", "str_len",
                                         "arr_count", "t_name_len", "t_ndims")]
    f = pool[int(rng.integers(len(pool)))]
    if f.kind == "t_type":
        new = int(GGUF_TYPES[int(rng.integers(len(GGUF_TYPES)))])
        if new == f.value or frozenset((new, f.value)) in SAME_SIZE_FLOATS:
            kind = "t_type_same_size"  # bytes per element unchanged: no structure can tell (llama.cpp neither)
    elif f.kind == "t_offset":
        choices = [f.value + 32, f.value - 32, f.value + 1, 0, 2**64 - 32, 2**64 - f.value, 2**63,
                   int(rng.choice([g.value for g in fields if g.kind == "t_offset"]))]
        new = int(choices[int(rng.integers(len(choices)))]) & (2**64 - 1)
    elif f.kind == "version":
        new = int([0, 1, 4, 5, 2, 3 << 24, 2**32 - 1][int(rng.integers(7))])
        if new == 2:  # v2 and v3 share one layout: a valid file
            kind = "version_supported"
    else:
        new = _interesting(rng, f.value, f.size)
    buf[f.pos:f.pos + f.size] = new.to_bytes(f.size, "little")
    if bytes(buf) == data:
        return bytes(buf), "noop"
    return bytes(buf), kind if kind in ("t_type_same_size", "version_supported") else f.kind


# ------------------------------------------------------------------------------------ safetensors layout

STRUCTURAL_ST = {"st_len", "st_offsets", "st_shape", "st_dtype", "st_truncate", "st_append", "st_dup"}
_ITEM = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _st_parts(data: bytes):
    (n,) = struct.unpack_from("<Q", data)
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def _st_join(header: dict, body: bytes, raw: Optional[str] = None) -> bytes:
    text = (raw if raw is not None else json.dumps(header)).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def mutate_safetensors(data: bytes, rng) -> Tuple[bytes, str]:
    """One seeded mutation of a safetensors file; returns (bytes, kind)."""
    n, header, body = _st_parts(data)
    names = sorted(k for k in header if k != "__metadata__")
    kind = ["st_flip", "st_data_flip", "st_len", "st_offsets", "st_offsets", "st_shape", "st_dtype", "st_truncate",
            "st_append", "st_dup"][int(rng.integers(10))]
    name = names[int(rng.integers(len(names)))]
    entry = header[name]
    if kind == "st_flip":
        buf = bytearray(data)
        buf[int(rng.integers(8, 8 + n))] ^= int(rng.integers(1, 256))
        return bytes(buf), kind
    if kind == "st_data_flip":
        buf = bytearray(data)
        buf[int(rng.integers(8 + n, len(buf)))] ^= int(rng.integers(1, 256))
        return bytes(buf), kind
    if kind == "st_len":
        delta = int([-1, 1, -8, 8, 2**40, -n, 2**63][int(rng.integers(7))])
        return struct.pack("<Q", (n + delta) & (2**64 - 1)) + data[8:], kind
    if kind == "st_offsets":
        begin, end = entry["data_offsets"]
        other = header[names[int(rng.integers(len(names)))]]["data_offsets"]
        how = int(rng.integers(5))
        if how == 0:  # alias another tensor's range (same length where possible)
            entry["data_offsets"] = [other[0], other[0] + end - begin]
        elif how == 1:  # shift
            d = int(rng.choice([-4, 4, -1, 1, 64]))
            entry["data_offsets"] = [begin + d, end + d]
        elif how == 2:  # swap with another tensor
            entry["data_offsets"], other[:] = list(other), [begin, end]
            if other[1] - other[0] == end - begin:  # equal sizes: a valid tiling, as the safetensors library agrees
                kind = "st_swap_same_size"
        elif how == 3:
            entry["data_offsets"] = [begin, end + 4]
        else:
            entry["data_offsets"] = [2**64 - 8, 2**64 - 8 + end - begin]
        return _st_join(header, body), kind
    if kind == "st_shape":
        shape = entry["shape"]
        how = int(rng.integers(4))
        if how == 0 and shape:
            shape[int(rng.integers(len(shape)))] += int(rng.choice([-1, 1, 2**31]))
        elif how == 1:
            entry["shape"] = shape + [1, 2]
        elif how == 2:
            entry["shape"] = [-1] + shape[1:]
        else:
            entry["shape"] = list(reversed(shape)) + [0]
        return _st_join(header, body), kind
    if kind == "st_dtype":
        choices = [d for d in _ITEM if d != entry["dtype"]] + ["F8_E4M3", "X", 5]
        entry["dtype"] = choices[int(rng.integers(len(choices)))]
        return _st_join(header, body), kind
    if kind == "st_truncate":
        return data[:int(rng.integers(0, len(data) - 1))], kind
    if kind == "st_append":
        return data + bytes(int(rng.integers(1, 64))), kind
    raw = json.dumps(header)  # st_dup: the same key twice, the second with another range
    dup = json.dumps({name: {**entry, "data_offsets": header[names[0]]["data_offsets"]}})[1:-1]
    return _st_join(header, body, raw[:-1] + ", " + dup + "}"), kind


def _same_header(a: bytes, b: bytes) -> bool:
    """Whether two safetensors files differ only in how the same header JSON is spelled."""
    try:
        (na,), (nb,) = struct.unpack_from("<Q", a), struct.unpack_from("<Q", b)
        return json.loads(a[8:8 + na]) == json.loads(b[8:8 + nb]) and a[8 + na:] == b[8 + nb:]
    except (ValueError, struct.error):
        return False


def mutate_config(config: dict, rng) -> Tuple[dict, str]:
    """A config.json with one key set to a value of the wrong kind or size."""
    cfg = json.loads(json.dumps(config))
    keys = ["hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "head_dim",
            "max_position_embeddings", "intermediate_size", "num_key_value_heads", "model_type", "rope_theta",
            "eos_token_id", "rope_parameters", "quantization", "rms_norm_eps", "tie_word_embeddings"]
    values = [0, -1, 64.5, "x", [], {}, None, 10**9, True, 2**40, [1, "a"], {"bits": 99, "group_size": 0}, 1e308,
              float("nan")]
    key = keys[int(rng.integers(len(keys)))]
    value = values[int(rng.integers(len(values)))]
    if rng.integers(8) == 0:
        cfg.pop(key, None)
    else:
        cfg[key] = value
    return cfg, "config"


# ----------------------------------------------------------------------------------------------- targets

@dataclass
class Target:
    name: str
    kind: str  # "gguf" or "dir"
    path: str  # seed file (gguf) or directory (dir)


def make_case(target: Target, seed: int, index: int, workdir: Path) -> Tuple[str, str]:
    """Write case `index` of `target` under workdir; return (path to load, mutation kind)."""
    rng = np.random.default_rng([seed, index, sum(target.name.encode())])
    if target.kind == "gguf":
        data = _cached_bytes(target.path)
        fields, end = _cached_fields(target.path)
        mutated, kind = mutate_gguf(data, fields, end, rng)
        out = workdir / "case.gguf"
        out.write_bytes(mutated)
        return str(out), kind
    src = Path(target.path)
    out = workdir / "case"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    weights = _cached_bytes(str(src / "model.safetensors"))
    if rng.integers(6) == 0:
        cfg, kind = mutate_config(json.loads((src / "config.json").read_text()), rng)
        (out / "config.json").write_text(json.dumps(cfg))
        (out / "model.safetensors").write_bytes(weights)
        return str(out), kind
    mutated, kind = mutate_safetensors(weights, rng)
    if mutated == weights or _same_header(mutated, weights):
        kind = "noop"
    (out / "model.safetensors").write_bytes(mutated)
    return str(out), kind


_BYTES: Dict[str, bytes] = {}
_FIELDS: Dict[str, tuple] = {}


def _cached_bytes(path: str) -> bytes:
    if path not in _BYTES:
        _BYTES[path] = Path(path).read_bytes()
    return _BYTES[path]


def _cached_fields(path: str):
    if path not in _FIELDS:
        _FIELDS[path] = gguf_fields(_cached_bytes(path))
    return _FIELDS[path]


def is_structural(kind: str) -> bool:
    """Whether a mutation of this kind breaks the file's layout, so that loading it must fail."""
    return kind in STRUCTURAL_GGUF or kind in STRUCTURAL_ST


# ------------------------------------------------------------------------------------------------ worker

def _run_one(path: str, ids: List[int]) -> Tuple[str, str]:
    import mlx.core as mx

    import mlxedge
    from mlxedge.errors import MlxedgeError

    try:
        model = mlxedge.load(path, dtype="float32", context_length=64)
        logits = np.asarray(model.logits(ids))
    except MlxedgeError as e:
        message = str(e)
        if "\n" in message or not message.strip():
            return "multiline", f"{type(e).__name__}: {message[:300]!r}"
        return "error", f"{type(e).__name__}: {message}"
    except Exception as e:  # noqa: BLE001 - the point is to find these
        return "unexpected", f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        mx.clear_cache()
    if not np.isfinite(logits).all():
        return "nonfinite", ""
    return "loaded", ""


def worker(spec_path: str) -> None:
    """Run cases [start, stop) of the spec, printing a JSON line per case; a watchdog ends a hung case."""
    spec = json.loads(Path(spec_path).read_text())
    target = Target(**spec["target"])
    workdir = Path(spec["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    current = {"index": None, "since": time.monotonic()}
    timeout = float(spec["case_timeout"])

    def watchdog():
        while True:
            time.sleep(0.2)
            if current["index"] is not None and time.monotonic() - current["since"] > timeout:
                print(json.dumps({"index": current["index"], "outcome": "hang", "detail": f"> {timeout} s"}),
                      flush=True)
                os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for index in range(spec["start"], spec["stop"]):
        path, kind = make_case(target, spec["seed"], index, workdir)
        print(json.dumps({"index": index, "started": True, "kind": kind}), flush=True)
        current.update(index=index, since=time.monotonic())
        outcome, detail = _run_one(path, spec["ids"])
        current["index"] = None
        print(json.dumps({"index": index, "kind": kind, "outcome": outcome, "detail": detail}), flush=True)


def run_cases(target: Target, seed: int, count: int, workdir: Path, case_timeout: float = 20.0,
              total_timeout: float = 3600.0, start: int = 0, ids: Optional[List[int]] = None,
              on_result: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """Run cases [start, start+count) of `target` in a worker subprocess; restart it after a crash or hang.

    Returns one dict per case: index, kind, outcome, detail. Raises TimeoutError naming the case that was
    running when `total_timeout` passed."""
    results: Dict[int, dict] = {}
    kinds: Dict[int, str] = {}
    deadline = time.monotonic() + total_timeout
    next_index, stop = start, start + count
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE),
                                                        os.environ.get("PYTHONPATH", "")]))
    workdir.mkdir(parents=True, exist_ok=True)
    while next_index < stop:
        spec = workdir / f"spec-{next_index}.json"
        spec.write_text(json.dumps({"target": target.__dict__, "seed": seed, "start": next_index, "stop": stop,
                                    "workdir": str(workdir / "w"), "case_timeout": case_timeout,
                                    "ids": ids or [5, 17, 42, 99, 3]}))
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "worker", str(spec)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        timer = threading.Timer(max(1.0, deadline - time.monotonic()), proc.kill)
        timer.start()
        started = None
        try:
            for line in proc.stdout:
                if not line.startswith("{"):
                    continue
                msg = json.loads(line)
                if msg.get("started"):
                    started = msg["index"]
                    kinds[started] = msg["kind"]
                    continue
                msg.setdefault("kind", kinds.get(msg["index"]))
                results[msg["index"]] = msg
                if on_result:
                    on_result(msg)
                started = None
            stderr = proc.stderr.read()
            proc.wait()
        finally:
            timer.cancel()
        if time.monotonic() >= deadline:
            raise TimeoutError(f"fuzz run passed {total_timeout} s; case {started} of {target.name} was running")
        done = [i for i in results if i >= next_index]
        last = max(done) if done else next_index - 1
        if proc.returncode == 0 and last == stop - 1:
            break
        if started is not None and started not in results:  # died inside a case: a crash
            msg = {"index": started, "kind": kinds.get(started), "outcome": "crash",
                   "detail": f"exit {proc.returncode}: {stderr.strip().splitlines()[-1][:200] if stderr.strip() else ''}"}
            results[started] = msg
            if on_result:
                on_result(msg)
            last = started
        elif last < next_index:  # died before starting any case: a harness problem, not a finding
            raise RuntimeError(f"fuzz worker failed before its first case: {stderr[-2000:]}")
        next_index = last + 1
    return [results[i] for i in sorted(results)]


def message_shape(message: str) -> str:
    """A message with file paths, quoted names, bracketed lists and numbers blanked, cut to a few words."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\([^)]*\)", "_", message)
    text = re.sub(r"\S*/\S*", "FILE", text)
    text = re.sub(r"-?\d[\d.e+]*", "N", text)
    return " ".join(text.split()[:9])


def summarize(results: List[dict]) -> Dict[str, int]:
    """Counts by outcome, and for errors by class and message prefix (file paths stripped)."""
    counts: Dict[str, int] = {}
    for r in results:
        key = r["outcome"]
        if key == "error":
            cls, _, message = r["detail"].partition(": ")
            key = f"error {cls}: {message_shape(message)}"
        elif key in ("unexpected", "crash", "hang", "nonfinite", "multiline"):
            key = f"{key} [{r['kind']}] {r['detail'][:80]}"
        else:
            key = f"{key} [{r['kind']}]"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        worker(sys.argv[2])
    else:
        sys.exit("usage: fuzz_harness.py worker SPEC.json")
