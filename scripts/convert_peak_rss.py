"""Peak RSS of `mlxedge convert --bits 4` and of mlx-lm's `convert -q` on one synthetic ~1 GB bf16 Llama.

Builds (once, cached) a random bf16 Llama checkpoint in Hugging Face layout (sharded safetensors, config.json,
a small tokenizer), then runs each converter in its own child process and reads that child's peak resident
set size from os.wait4 (ru_maxrss). The bound issue 5 sets for ours:

    final quantized bytes + the largest single tensor in fp32 + 300 MB

where the final quantized bytes come from mlxedge.memory.plan (and are checked against the bytes written).

    .venv/bin/python scripts/convert_peak_rss.py [--workdir DIR] [--bits 4] [--json out.json]

Exit status 1 when ours is above the bound or above mlx-lm's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # rss.py

from mlxedge.memory.plan import weight_plan  # noqa: E402
from mlxedge.paths import user_cache_home  # noqa: E402
from mlxedge.memory.units import format_bytes  # noqa: E402
from rss import rusage_maxrss_bytes  # noqa: E402

MB = 10**6
SLACK_BYTES = 300 * MB

# ~0.49 B parameters: 983 MB in bf16. Untied 32000 × 2048 embedding and head: the largest tensor, 262 MB in fp32.
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4,
    "head_dim": 128, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
    "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
}


def tensor_shapes(cfg: dict) -> dict:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "model.norm.weight": (h,)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    return shapes


def write_tokenizer(directory: Path) -> None:
    """A small byte-level BPE tokenizer (ids < vocab_size), saved the way transformers reads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    from pydoc_data.topics import topics

    tok.train_from_iterator(list(topics.values()), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(directory))


def build_checkpoint(target: Path) -> Path:
    """Random bf16 weights in two shards, written one shard at a time; atomic (temp dir, then rename)."""
    if (target / "config.json").exists():
        return target
    import mlx.core as mx

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = tensor_shapes(CONFIG)
    names = sorted(shapes)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map, total = {}, 0
    mx.random.seed(0)
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {}
        for name in shard:
            shape = shapes[name]
            if len(shape) == 1:
                arrays[name] = mx.ones(shape, dtype=mx.bfloat16)
            else:
                arrays[name] = (mx.random.normal(shape) * 0.02).astype(mx.bfloat16)
            weight_map[name] = file
            total += arrays[name].nbytes
        mx.save_safetensors(str(tmp / file), arrays, metadata={"format": "pt"})
        del arrays
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2))
    write_tokenizer(tmp)
    os.replace(tmp, target)
    return target


# Linux carries a process's peak RSS across exec (the forked copy of the parent counts), so a child of this
# script would inherit this script's own peak. A bare launcher process forks the converter and reports the
# converter's ru_maxrss from wait4: its floor is the launcher's few MB, not ours.
LAUNCHER = """
import json, os, sys
out = sys.argv[1]
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(out, "w") as f:
    json.dump({"ru_maxrss": usage.ru_maxrss, "exit_status": os.waitstatus_to_exitcode(status)}, f)
"""


def peak_rss_of(cmd: list, workdir: Path) -> tuple:
    """Run cmd under the launcher; return (its peak RSS in bytes, seconds, exit status, stderr tail)."""
    report = workdir / "rusage.json"
    report.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(report)] + cmd,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - start
    tail = proc.stderr.decode(errors="replace")[-2000:]
    if not report.exists():
        return 0, seconds, proc.returncode or -1, tail
    result = json.loads(report.read_text())
    return rusage_maxrss_bytes(result["ru_maxrss"]), seconds, result["exit_status"], tail


def dir_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern))


def ours_command(src: Path, dest: Path, bits: int, group_size: int) -> tuple:
    """The `mlxedge convert` CLI when it exists, else the same call through the public Python API."""
    import importlib.util

    if importlib.util.find_spec("mlxedge.cli") is not None:
        return ([sys.executable, "-c", "import sys; from mlxedge.cli import main; sys.exit(main())", "convert",
                 str(src), str(dest), "--bits", str(bits), "--group-size", str(group_size)],
                "mlxedge convert (CLI)")
    code = (f"import mlxedge; mlxedge.convert({str(src)!r}, {str(dest)!r}, bits={bits}, group_size={group_size})")
    return [sys.executable, "-c", code], "mlxedge.convert (Python API; no CLI yet)"


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--build-only":
        build_checkpoint(Path(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path,
                        default=user_cache_home() / "mlxedge-bench")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--skip-mlx-lm", action="store_true")
    args = parser.parse_args()

    src = args.workdir / "synthetic-llama-bf16-1g"
    if not (src / "config.json").exists():  # built in a child, so this process stays small
        subprocess.run([sys.executable, __file__, "--build-only", str(src)], check=True)
    from mlxedge.sources.safetensors_header import read_header

    infos = {}
    for f in sorted(src.glob("*.safetensors")):
        infos.update(read_header(f))
    planned = weight_plan(CONFIG, infos, bits=args.bits, group_size=args.group_size, dtype_bytes=2)["bytes"]
    largest_fp32 = max(info.nbytes // 2 * 4 for info in infos.values())  # bf16 -> fp32
    bound = planned + largest_fp32 + SLACK_BYTES
    results = {"checkpoint": str(src), "checkpoint_bytes": dir_bytes(src), "bits": args.bits,
               "group_size": args.group_size, "planned_quantized_bytes": planned,
               "largest_tensor_fp32_bytes": largest_fp32, "bound_bytes": bound, "runs": {}}

    out_root = args.workdir / "convert-out"
    shutil.rmtree(out_root, ignore_errors=True)
    out_root.mkdir(parents=True)
    cmd, label = ours_command(src, out_root / "mlxedge", args.bits, args.group_size)
    runs = [("mlxedge", label, cmd)]
    if not args.skip_mlx_lm:
        runs.append(("mlx_lm", "python -m mlx_lm convert -q", [
            sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path",
            str(out_root / "mlx_lm"), "-q", "--q-bits", str(args.bits), "--q-group-size", str(args.group_size)]))
    for key, label, cmd in runs:
        peak, seconds, rc, tail = peak_rss_of(cmd, out_root)
        results["runs"][key] = {"command": label, "peak_rss_bytes": peak, "seconds": round(seconds, 1),
                                "exit_status": rc, "written_bytes": dir_bytes(out_root / key)}
        if rc != 0:
            results["runs"][key]["stderr_tail"] = tail

    print(f"checkpoint: {src} ({format_bytes(results['checkpoint_bytes'])} bf16)")
    print(f"bound: planned {args.bits}-bit bytes {format_bytes(planned)} + largest tensor in fp32 "
          f"{format_bytes(largest_fp32)} + 300 MB = {format_bytes(bound)}")
    print(f"{'converter':<44} {'peak RSS':>10} {'written':>10} {'time':>7}  status")
    for key, run in results["runs"].items():
        print(f"{run['command']:<44} {format_bytes(run['peak_rss_bytes']):>10} "
              f"{format_bytes(run['written_bytes']):>10} {run['seconds']:>6.1f}s  "
              f"{'ok' if run['exit_status'] == 0 else 'FAILED (' + str(run['exit_status']) + ')'}")
        if run["exit_status"] != 0:
            print(run["stderr_tail"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))

    ours = results["runs"]["mlxedge"]
    failures = []
    if ours["exit_status"] != 0:
        failures.append("mlxedge convert failed")
    else:
        if ours["peak_rss_bytes"] > bound:
            failures.append(f"mlxedge peak {format_bytes(ours['peak_rss_bytes'])} is above the bound")
        if ours["written_bytes"] and abs(ours["written_bytes"] - planned) > 1 * MB:
            failures.append(f"mlxedge wrote {format_bytes(ours['written_bytes'])}, the plan said {format_bytes(planned)}")
        theirs = results["runs"].get("mlx_lm")
        if theirs and theirs["exit_status"] == 0 and ours["peak_rss_bytes"] > theirs["peak_rss_bytes"]:
            failures.append("mlxedge peak is above mlx-lm's")
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
