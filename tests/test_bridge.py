"""Conformance of `mlxedge bridge`: driven as a subprocess through every message type; every line it prints
is valid against docs/bridge/*.schema.json; cancel lands within one token; malformed lines get an error and
the bridge keeps serving; EOF and SIGTERM exit 0."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import pytest



from tiny_chat import tiny_chat  # noqa: F401  (fixture)
ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "bridge"


def schemas():
    return {p.name[len("event."):-len(".schema.json")]: json.loads(p.read_text()) for p in DOCS.glob("event.*")}


class BridgeProcess:
    def __init__(self, *args):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-c", "from mlxedge.cli import main; main()", "bridge", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, cwd=ROOT)
        self.lines: "queue.Queue" = queue.Queue()
        self.seen = []
        self.validators = {name: jsonschema.Draft202012Validator(s) for name, s in schemas().items()}
        threading.Thread(target=self._read, daemon=True).start()
        self.stderr = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def send(self, obj):
        self.proc.stdin.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
        self.proc.stdin.flush()

    def next(self, timeout=60):
        line = self.lines.get(timeout=timeout)
        assert line is not None, "bridge closed stdout; stderr:\n" + "".join(self.stderr[-20:])
        msg = json.loads(line)  # every stdout line is one JSON object
        assert msg.get("event") in self.validators, msg
        self.validators[msg["event"]].validate(msg)
        self.seen.append(msg)
        return msg

    def until(self, rid, final=("result", "done", "error"), timeout=60):
        """Messages of request rid up to and including its final one (others are kept in self.seen)."""
        out = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next(timeout=max(0.1, deadline - time.monotonic()))
            if msg.get("id") == rid:
                out.append(msg)
                if msg["event"] in final:
                    return out


@pytest.fixture(scope="module")
def bridge(tiny_chat):
    b = BridgeProcess()
    assert b.next()["event"] == "ready"
    yield b
    if b.proc.poll() is None:
        b.proc.kill()


def test_docs_schemas_are_the_protocol(tmp_path):
    from mlxedge.bridge.protocol import schema_files

    files = schema_files()
    assert sorted(p.name for p in DOCS.glob("*.schema.json")) == sorted(files)
    for name, schema in files.items():
        assert json.loads((DOCS / name).read_text()) == schema, f"{name} is stale: regenerate docs/bridge"
        jsonschema.Draft202012Validator.check_schema(schema)


def test_load_status_tokenize(bridge, tiny_chat):
    bridge.send({"id": "L", "op": "load", "model": str(tiny_chat)})
    msgs = bridge.until("L")
    assert msgs[-1]["event"] == "result", msgs[-1]
    progress = [m for m in msgs if m["event"] == "progress"]
    assert progress and progress[-1]["processed"] == progress[-1]["total"] and progress[0]["stage"] == "load"
    assert msgs[-1]["result"]["architecture"] == "llama"
    bridge.send({"id": 2, "op": "status"})
    status = bridge.until(2)[-1]["result"]
    assert [r["name"] for r in status["resident"]] == [str(tiny_chat)]
    bridge.send({"id": 3, "op": "tokenize", "text": "Hello world"})
    from transformers import AutoTokenizer
    expected = AutoTokenizer.from_pretrained(tiny_chat).encode("Hello world")
    assert bridge.until(3)[-1]["result"]["tokens"] == expected


def test_generate_and_chat_stream_progress_deltas_done(bridge):
    bridge.send({"id": "g", "op": "generate", "prompt": "Once upon a time", "raw": True, "max_tokens": 6})
    msgs = bridge.until("g")
    kinds = [m["event"] for m in msgs]
    assert kinds[0] == "progress" and kinds[-1] == "done" and kinds.count("delta") == 6
    prefill = [m for m in msgs if m["event"] == "progress"]
    assert all(m["stage"] == "prefill" for m in prefill) and prefill[-1]["processed"] == prefill[-1]["total"]
    done = msgs[-1]
    assert done["text"] == "".join(m["text"] for m in msgs if m["event"] == "delta")
    assert done["finish_reason"] == "length" and done["stats"]["generation_tokens"] == 6
    bridge.send({"id": "c", "op": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                 "logprobs": True})
    msgs = bridge.until("c")
    deltas = [m for m in msgs if m["event"] == "delta" and "token" in m]
    assert msgs[-1]["event"] == "done" and len(deltas) == 4
    assert all(m["logprob"]["token_id"] == m["token"] and m["logprob"]["logprob"] <= 0 for m in deltas)


def test_sessions_keep_history(bridge):
    bridge.send({"id": "s1", "op": "session.create", "system": "Be brief."})
    sid = bridge.until("s1")[-1]["result"]["session"]
    bridge.send({"id": "s2", "op": "session.send", "session": sid, "content": "Hello", "max_tokens": 3})
    reply = bridge.until("s2")[-1]
    assert reply["event"] == "done"
    bridge.send({"id": "s3", "op": "session.messages", "session": sid})
    history = bridge.until("s3")[-1]["result"]["messages"]
    assert history == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                       {"role": "assistant", "content": reply["text"]}]
    # the second turn sees the whole conversation: same text as a chat request with that history
    bridge.send({"id": "s4", "op": "session.send", "session": sid, "content": "More", "max_tokens": 3})
    second = bridge.until("s4")[-1]
    bridge.send({"id": "s5", "op": "chat", "messages": history + [{"role": "user", "content": "More"}],
                 "max_tokens": 3})
    assert bridge.until("s5")[-1]["text"] == second["text"]
    bridge.send({"id": "s6", "op": "session.reset", "session": sid})
    bridge.until("s6")
    bridge.send({"id": "s7", "op": "session.messages", "session": sid})
    assert bridge.until("s7")[-1]["result"]["messages"] == [{"role": "system", "content": "Be brief."}]
    bridge.send({"id": "s8", "op": "session.close", "session": sid})
    bridge.until("s8")
    bridge.send({"id": "s9", "op": "session.send", "session": sid, "content": "gone?"})
    error = bridge.until("s9")[-1]
    assert error["event"] == "error" and error["code"] == "not_found"


def test_cancel_within_one_token(bridge):
    bridge.send({"id": "long", "op": "generate", "prompt": "Tell", "raw": True, "max_tokens": 1500})
    deltas_before = 0
    while deltas_before < 3:
        msg = bridge.next()
        # a generation that ends (or fails) first would leave this loop waiting out the queue's timeout
        assert not (msg.get("id") == "long" and msg["event"] in ("done", "error")), f"ended before 3 deltas: {msg}"
        deltas_before += msg.get("id") == "long" and msg["event"] == "delta"
    bridge.send({"id": "x", "op": "cancel", "target": "long"})
    after_result, result_seen, done = 0, False, None
    while done is None:
        msg = bridge.next()
        if msg.get("id") == "x":
            assert msg["result"] == {"target": "long", "cancelled": True}
            result_seen = True
        elif msg.get("id") == "long" and msg["event"] == "delta" and result_seen:
            after_result += 1
        elif msg.get("id") == "long" and msg["event"] == "done":
            done = msg
    assert done["finish_reason"] == "cancelled"
    assert after_result <= 1
    assert done["stats"]["generation_tokens"] < 1500


@pytest.mark.parametrize("line, code", [
    ("this is not json", "bad_request"),
    ("[1, 2, 3]", "bad_request"),
    ('{"id": 9, "op": "explode"}', "bad_request"),
    ('{"id": 9, "op": "generate"}', "bad_request"),
    ('{"id": 9, "op": "generate", "prompt": "x", "max_tokens": "many"}', "bad_request"),
    ('{"id": 9, "op": "chat", "messages": [{"role": "user", "content": "x"}], "model": "/no/such/model"}',
     "not_found"),
    ('{"id": 9, "op": "unload", "model": "never-loaded"}', None),
])
def test_malformed_lines_get_errors_and_serving_continues(bridge, line, code):
    bridge.send(line)
    msg = bridge.next()
    if code is None:
        assert msg["event"] == "result" and msg["result"] == {"unloaded": False}
    else:
        assert msg["event"] == "error" and msg["code"] == code and msg["message"]
    bridge.send({"id": "alive", "op": "status"})
    assert bridge.until("alive")[-1]["event"] == "result"


def test_duplicate_running_id_is_refused(bridge):
    bridge.send({"id": "dup", "op": "generate", "prompt": "a", "raw": True, "max_tokens": 400})
    bridge.send({"id": "dup", "op": "status"})
    msgs = bridge.until("dup", final=("error",))
    assert msgs[-1]["code"] == "bad_request" and "in use" in msgs[-1]["message"]
    bridge.send({"id": "stop-dup", "op": "cancel", "target": "dup"})
    bridge.until("dup", final=("done",))
    for _ in range(3):  # an id is free again as soon as its final event is out
        bridge.send({"id": "dup", "op": "generate", "prompt": "b", "raw": True, "max_tokens": 1})
        assert bridge.until("dup")[-1]["event"] == "done"


def test_eof_exits_zero_after_finishing_work(tiny_chat):
    b = BridgeProcess("--model", str(tiny_chat))
    assert b.next()["event"] == "ready"
    b.send({"id": 1, "op": "generate", "prompt": "hi", "raw": True, "max_tokens": 3})
    b.proc.stdin.close()
    assert b.proc.wait(timeout=120) == 0
    msgs = []
    while True:
        line = b.lines.get(timeout=10)
        if line is None:
            break
        msgs.append(json.loads(line))
    assert msgs[-1]["event"] == "done" and msgs[-1]["id"] == 1   # drained before exit
    assert not any("Traceback" in line for line in b.stderr)


def test_sigterm_exits_zero_mid_generation(tiny_chat):
    b = BridgeProcess("--model", str(tiny_chat))
    assert b.next()["event"] == "ready"
    b.send({"id": 1, "op": "generate", "prompt": "hi", "raw": True, "max_tokens": 1500})
    while b.next()["event"] != "delta":
        pass
    b.proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(timeout=60) == 0
