"""The bridge loop: JSON request lines on stdin, JSON event lines on stdout, over one Engine.

stdout carries protocol messages only (the process's fd 1 is pointed at stderr, so stray prints from any
library land in the log, not in the protocol). Each streaming request is pumped by its own thread, so
the reader keeps taking lines (e.g. `cancel`) while generations run. A malformed line answers an error
event with id null and the bridge keeps serving; EOF drains running requests and exits 0; SIGTERM
cancels them and exits 0.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import uuid
from typing import IO, Optional

from ..engine import BadRequestError, Engine, ModelNotFoundError, Request, error_code, error_message
from .protocol import EVENTS, PROTOCOL_VERSION, REQUESTS

log = logging.getLogger("mlxedge.bridge")
STREAMING = ("generate", "chat", "session.send")
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


class _Terminate(Exception):
    pass


class _Call:
    """One request while it runs: its id and, for a generation, the engine handle to cancel."""

    def __init__(self, rid):
        self.rid = rid
        self.handle = None


class Bridge:
    def __init__(self, engine: Engine, out: IO[str], default_model: Optional[str] = None, version: str = "0"):
        self.engine = engine
        self.out = out
        self.default_model = default_model
        self.version = version
        self._lock = threading.Lock()
        self._inflight = {}          # id -> _Call of the request running under that id
        self._threads = []
        self._sessions = {}          # session id -> {"model", "system", "messages"}
        from jsonschema import Draft202012Validator

        self._validators = {op: Draft202012Validator(s) for op, s in REQUESTS.items()}

    # ------------------------------------------------------------------ output
    def emit(self, obj: dict) -> None:
        line = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
        with self._lock:
            self.out.write(line + "\n")
            self.out.flush()

    def error(self, rid, exc_or_code, message: Optional[str] = None) -> None:
        if isinstance(exc_or_code, BaseException):
            code, message = error_code(exc_or_code), error_message(exc_or_code)
            if code == "internal":
                log.error("request %r failed", rid, exc_info=exc_or_code)
        else:
            code = exc_or_code
        self.emit({"id": rid, "event": "error", "code": code, "message": message})

    # ------------------------------------------------------------------ input
    def serve(self, lines) -> int:
        self.emit({"event": "ready", "protocol": PROTOCOL_VERSION, "version": self.version})
        try:
            for line in lines:
                if line.strip():
                    self.handle_line(line)
            self._drain()
        except _Terminate:
            self._cancel_all()
            self._drain()
        finally:
            self.engine.close()
        return 0

    def handle_line(self, line: str) -> None:
        try:
            msg = json.loads(line)
        except ValueError as exc:
            return self.error(None, "bad_request", f"not a JSON object: {exc.msg} at column {exc.colno}")
        rid = msg.get("id") if isinstance(msg, dict) else None
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            rid = None
        if not isinstance(msg, dict) or msg.get("op") not in REQUESTS:
            ops = ", ".join(sorted(REQUESTS))
            return self.error(rid, "bad_request", f"each line must be an object with an `op` (one of: {ops})")
        problem = next(iter(sorted(self._validators[msg["op"]].iter_errors(msg), key=lambda e: e.path)), None)
        if problem is not None:
            where = "/".join(str(p) for p in problem.absolute_path)
            return self.error(rid, "bad_request", f"{msg['op']}: {where + ': ' if where else ''}{problem.message}")
        call = _Call(rid)
        with self._lock:
            taken = rid in self._inflight
            if not taken:
                self._inflight[rid] = call
        if taken:
            return self.error(rid, "bad_request", f"id {rid!r} is already in use by a running request")
        try:
            self._dispatch(call, msg)
        except Exception as exc:
            self._release(call)
            self.error(rid, exc)

    def _release(self, call: _Call) -> None:
        """Free the id (only if it still belongs to this call: the client may have reused it already)."""
        with self._lock:
            if self._inflight.get(call.rid) is call:
                del self._inflight[call.rid]

    def _in_thread(self, call: _Call, fn) -> None:
        rid = call.rid

        def body():
            try:
                fn()
            except Exception as exc:
                self._release(call)
                self.error(rid, exc)
            finally:
                self._release(call)

        thread = threading.Thread(target=body, name=f"bridge-{rid}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _result(self, call: _Call, op, result) -> None:
        """The final answer of a request: its id is free for reuse once the client can see this."""
        self._release(call)
        self.emit({"id": call.rid, "event": "result", "op": op, "result": result})

    # ------------------------------------------------------------------ operations
    def _model(self, msg) -> str:
        model = msg.get("model") or self.default_model
        if not model:
            raise BadRequestError("no model: give `model`, or send a `load` first")
        return model

    def _dispatch(self, call: _Call, msg) -> None:
        op, rid = msg["op"], call.rid
        if op in STREAMING:
            return self._start_generation(call, msg)
        if op == "cancel":
            with self._lock:
                target = self._inflight.get(msg["target"])
            handle = target.handle if target is not None else None
            if handle is not None:
                handle.cancel()
            return self._result(call, op, {"target": msg["target"], "cancelled": handle is not None})
        if op == "load":
            self.default_model = msg["model"]   # now, so that requests sent right after it use it

            def load():
                def progress(done, total):
                    self.emit({"id": rid, "event": "progress", "stage": "load", "processed": int(done),
                               "total": int(total)})
                info = self.engine.load(msg["model"], progress=progress, keep_alive=msg.get("keep_alive"))
                self._result(call, op, info)
            return self._in_thread(call, load)
        if op == "unload":
            return self._in_thread(call, lambda: self._result(call, op, {"unloaded": self.engine.unload(msg["model"])}))
        if op == "status":
            return self._result(call, op, {**self.engine.status(), "sessions": len(self._sessions),
                                          "default_model": self.default_model})
        if op == "tokenize":
            model = self._model(msg)
            return self._in_thread(call, lambda: self._result(call, op, {"tokens": self.engine.tokenize(model,
                                                                                                     msg["text"])}))
        if op == "session.create":
            sid = uuid.uuid4().hex[:16]
            self._sessions[sid] = {"model": self._model(msg), "system": msg.get("system"), "messages": []}
            return self._result(call, op, {"session": sid, "model": self._sessions[sid]["model"]})
        session = self._session(msg)
        if op == "session.messages":
            return self._result(call, op, {"messages": _history(session)})
        if op == "session.reset":
            session["messages"] = []
            return self._result(call, op, {"session": msg["session"]})
        if op == "session.close":
            self._sessions.pop(msg["session"], None)
            return self._result(call, op, {"session": msg["session"]})
        raise BadRequestError(f"unknown op {op!r}")  # unreachable: the schema lists every op

    def _session(self, msg) -> dict:
        session = self._sessions.get(msg["session"])
        if session is None:
            raise ModelNotFoundError(f"no session {msg['session']!r} (create one with session.create)")
        return session

    def _start_generation(self, call: _Call, msg) -> None:
        op, rid = msg["op"], call.rid
        session = None
        if op == "generate":
            model, prompt, raw = self._model(msg), msg["prompt"], bool(msg.get("raw"))
        elif op == "chat":
            model, prompt, raw = self._model(msg), msg["messages"], False
        else:
            session = self._session(msg)
            if session.get("busy"):
                raise BadRequestError(f"session {msg['session']!r} is still answering; wait for its done event "
                                      "or cancel it")
            model, raw = session["model"], False
            prompt = _history(session) + [{"role": "user", "content": msg["content"]}]
        stop = msg.get("stop") or []
        request = Request(model=model, prompt=prompt, raw=raw, max_tokens=msg.get("max_tokens", 256),
                          sampling={k: msg[k] for k in SAMPLING if k in msg},
                          stop=[stop] if isinstance(stop, str) else list(stop),
                          logprobs=bool(msg.get("logprobs")), top_logprobs=msg.get("top_logprobs", 0))
        handle = self.engine.submit(request)
        call.handle = handle
        if session is not None:
            session["busy"] = True

        def free():  # before the final event: the client may reuse the id or the session right after it
            if session is not None:
                session["busy"] = False
            self._release(call)

        def pump():
            try:
                relay()
            finally:
                free()

        def relay():
            parts = []
            for event in handle:
                if event.kind == "progress":
                    self.emit({"id": rid, "event": "progress", "stage": "prefill", "processed": event.processed,
                               "total": event.total})
                elif event.kind == "delta":
                    parts.append(event.text)
                    out = {"id": rid, "event": "delta", "text": event.text}
                    if event.token is not None:
                        out["token"] = event.token
                    if event.logprob is not None:
                        out["logprob"] = event.logprob
                    self.emit(out)
                elif event.kind == "error":
                    free()
                    self.error(rid, event.code, event.message)
                elif event.kind == "done":
                    text = "".join(parts)
                    if session is not None and event.finish_reason != "cancelled":
                        session["messages"] += [{"role": "user", "content": msg["content"]},
                                                {"role": "assistant", "content": text}]
                    free()
                    self.emit({"id": rid, "event": "done", "finish_reason": event.finish_reason, "text": text,
                               "stats": event.stats})

        self._in_thread(call, pump)

    def _cancel_all(self) -> None:
        with self._lock:
            handles = [c.handle for c in self._inflight.values() if c.handle is not None]
        for handle in handles:
            handle.cancel()

    def _drain(self) -> None:
        for thread in list(self._threads):
            thread.join()


def _history(session: dict) -> list:
    system = [{"role": "system", "content": session["system"]}] if session.get("system") else []
    return system + list(session["messages"])


def run_stdio(engine: Engine, default_model: Optional[str] = None, version: str = "0") -> int:
    """Serve the protocol on this process's stdin/stdout until EOF or SIGTERM; return the exit status."""
    protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())   # anything else written to stdout goes to the log
    sys.stdout = sys.stderr

    def terminate(signum, frame):
        raise _Terminate()

    signal.signal(signal.SIGTERM, terminate)
    bridge = Bridge(engine, protocol_out, default_model=default_model, version=version)
    stdin = open(sys.stdin.fileno(), "r", encoding="utf-8", errors="replace", closefd=False, buffering=1)
    return bridge.serve(stdin)


__all__ = ["Bridge", "run_stdio", "EVENTS"]
