"""One TS013 codec in its own V8 isolate (mini-racer), bounded in time and memory.

Every method here blocks: `Drivers` calls them on its thread pool, one call per codec at a
time. V8 runs with the GIL released, so a codec that loops does not stall the event loop.
Values cross the boundary as JSON text, so the codec sees plain arrays and objects and
iotflow gets plain Python values back.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from py_mini_racer import (
    DEFAULT_V8_FLAGS,
    JSEvalException,
    JSOOMException,
    JSTimeoutException,
    MiniRacer,
    init_mini_racer,
)

# V8 guards its code with the CPU's memory protection keys where the CPU has them (x86
# PKU), and then only threads made after V8 started may run JavaScript safely. Here V8
# starts in the executor thread that loads the first driver, after the event loop's and
# the spool's threads: on a PKU machine, a codec stopped at its time limit later crashed
# the process (a segmentation fault in mini-racer, reproduced with mini-racer 0.14.1 on
# an AMD EPYC; tests/test_drivers.py). Without the keys, V8 runs from any thread.
_V8_FLAGS = (*DEFAULT_V8_FLAGS, "--no-memory-protection-keys")

# Taken away before the codec is loaded: timers would run codec code outside a call's
# time limit. V8 itself has no file, network or process access (no require, fetch, process).
# mini-racer defines them non-configurable: overwritten, since `delete` would do nothing.
_PRELUDE = """
["setTimeout", "clearTimeout", "setInterval", "clearInterval"].forEach(function (name) {
  if (name in globalThis) { globalThis[name] = undefined; }
});
"""

# The TS013 calls, wrapped so that input and output are JSON text.
_WRAPPERS = """
var __iotflow_decode = function (text) {
  var input = JSON.parse(text);
  input.recvTime = new Date(input.recvTime);
  var out = decodeUplink(input);
  return JSON.stringify(out === undefined ? null : out);
};
var __iotflow_encode = function (text) {
  var out = encodeDownlink(JSON.parse(text));
  return JSON.stringify(out === undefined ? null : out);
};
var __iotflow_shape = function () {
  return JSON.stringify({
    decode: typeof decodeUplink === "function",
    encode: typeof encodeDownlink === "function"
  });
};
"""

# The codes of payloadDecodedError (docs/drivers.md "Errors").
TIMEOUT = "timeout"
MEMORY = "memory_limit"
EXCEPTION = "exception"
CODEC_ERRORS = "codec_errors"
INVALID_RESULT = "invalid_result"
LOAD_FAILED = "driver_unavailable"
NOT_FOUND = "driver_not_found"
NO_DRIVER = "no_driver"
INVALID_INPUT = "invalid_input"
NO_ENCODER = "no_encoder"

_MESSAGE = 500  # characters of a codec's error message kept


class CodecFault(Exception):
    """A call that gave no usable result: `code` is one of the codes above."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message[:_MESSAGE]

    def document(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True, slots=True)
class Limits:
    timeout: float  # seconds per call
    memory: int  # bytes of V8 heap


class Codec:
    """A loaded driver.js. `decode`/`encode` raise CodecFault, nothing else."""

    def __init__(self, path: Path, limits: Limits) -> None:
        self.path = path
        self.limits = limits
        self.source = path.read_text(encoding="utf-8")
        self.has_encoder = False
        self._lock = threading.Lock()  # one V8 context: one call at a time
        self._ctx: MiniRacer | None = None
        self._ctx = self._load()

    def _load(self) -> MiniRacer:
        # Before the first context; a no-op after it.
        init_mini_racer(flags=_V8_FLAGS, ignore_duplicate_init=True)
        ctx = MiniRacer()
        try:
            ctx.set_hard_memory_limit(self.limits.memory)
            ctx.eval(_PRELUDE)
            # Top-level code is bounded too: a driver.js that loops while loading fails.
            ctx.eval(self.source, timeout_sec=self.limits.timeout * 20)
            ctx.eval(_WRAPPERS)
            shape = orjson.loads(str(ctx.call("__iotflow_shape")))
        except JSTimeoutException:
            ctx.close()
            raise CodecFault(LOAD_FAILED, "loading driver.js took too long") from None
        except JSOOMException:
            ctx.close()
            raise CodecFault(LOAD_FAILED, "loading driver.js ran out of memory") from None
        except JSEvalException as exc:
            ctx.close()
            raise CodecFault(LOAD_FAILED, _first_line(exc)) from None
        if not shape["decode"]:
            ctx.close()
            raise CodecFault(LOAD_FAILED, "driver.js defines no function decodeUplink")
        self.has_encoder = bool(shape["encode"])
        return ctx

    def _call(self, function: str, argument: dict[str, Any]) -> Any:
        with self._lock:
            if self._ctx is None:  # replaced after a fault; load again
                self._ctx = self._load()
            ctx = self._ctx
            try:
                text = ctx.call(
                    function,
                    orjson.dumps(argument).decode(),
                    timeout_sec=self.limits.timeout,
                )
            except JSTimeoutException:
                self._discard()
                limit = round(self.limits.timeout * 1000)
                raise CodecFault(TIMEOUT, f"the codec ran longer than {limit} ms") from None
            except JSOOMException:
                self._discard()
                raise CodecFault(
                    MEMORY, f"the codec used more than {self.limits.memory} bytes"
                ) from None
            except JSEvalException as exc:
                if ctx.was_hard_memory_limit_reached():
                    self._discard()
                    raise CodecFault(
                        MEMORY, f"the codec used more than {self.limits.memory} bytes"
                    ) from None
                raise CodecFault(EXCEPTION, _first_line(exc)) from None
        try:
            return orjson.loads(str(text))
        except orjson.JSONDecodeError:
            raise CodecFault(INVALID_RESULT, "the codec returned no JSON value") from None

    def _discard(self) -> None:
        """After a fault the context is kept: V8 stops the call cleanly and the context
        stays usable (a new one per fault would cost a load, and mini-racer reports a
        stray callback when a context is closed right after an interrupted call)."""

    def _shut(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None

    def decode(self, payload: bytes, f_port: int | None, recv_time: str) -> Any:
        """TS013 decodeUplink → its `data`; `errors` or a bad shape raise CodecFault."""
        out = self._call(
            "__iotflow_decode", {"bytes": list(payload), "fPort": f_port, "recvTime": recv_time}
        )
        if not isinstance(out, dict):
            raise CodecFault(INVALID_RESULT, "decodeUplink returned no object")
        _raise_errors(out, "decodeUplink")
        if "data" not in out:
            raise CodecFault(INVALID_RESULT, "decodeUplink returned no data")
        return out["data"]

    def encode(self, data: Any, f_port: int | None) -> tuple[bytes, int | None]:
        """TS013 encodeDownlink → (bytes, fPort)."""
        if not self.has_encoder:
            raise CodecFault(NO_ENCODER, "driver.js defines no function encodeDownlink")
        out = self._call("__iotflow_encode", {"data": data, "fPort": f_port})
        if not isinstance(out, dict):
            raise CodecFault(INVALID_RESULT, "encodeDownlink returned no object")
        _raise_errors(out, "encodeDownlink")
        raw = out.get("bytes")
        if not isinstance(raw, list) or not all(
            isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in raw
        ):
            raise CodecFault(INVALID_RESULT, "encodeDownlink returned no bytes (0..255)")
        port = out.get("fPort", f_port)
        if port is not None and (not isinstance(port, int) or not 1 <= port <= 223):
            raise CodecFault(INVALID_RESULT, "encodeDownlink returned an fPort outside 1..223")
        return bytes(raw), port

    def close(self) -> None:
        with self._lock:
            self._shut()


def _raise_errors(out: dict[str, Any], function: str) -> None:
    errors = out.get("errors")
    if errors:
        texts = errors if isinstance(errors, list) else [errors]
        raise CodecFault(CODEC_ERRORS, "; ".join(str(e) for e in texts))


def _first_line(exc: Exception) -> str:
    """V8's message without the source excerpt mini-racer appends (it could be long)."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    first = lines[0].strip() if lines else type(exc).__name__
    return re.sub(r"^<anonymous>:\d+: ", "", first)
