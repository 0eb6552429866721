"""The function-call test harness that runs inside the sandbox, and the value codec it shares with
the host. One file, two uses:

* shipped as text (verifiers/mbpp.py reads this file and hands it to ``run_sandboxed``) and run as
  the sandbox's main program: it reads a job as JSON on stdin, execs the untrusted code, calls its
  entry point on every input and streams one JSON line per finished split on a private dup of the
  original stdout (stdout/stderr themselves go to /dev/null, so the program cannot write into the
  result stream by accident). Only the standard library; evalplus's ``eval/utils.py`` is loaded by
  path when the host found one.
* imported by the host for the codec (:func:`encode_value` for inputs it sends,
  :func:`decode_output` for the outputs the program returned), so both ends read and write the
  same format.

Values travel as JSON with tagged containers, never pickle: ``None``/bool/int/float/str are raw
JSON; containers are ``[tag, payload]`` lists (``L`` list, ``T`` tuple, ``S`` set, ``F`` frozenset,
``D`` dict, ``C`` complex, ``B`` bytes, ``I`` huge int). Outputs may also carry ``A``/``G`` (numpy
array / scalar), ``U`` (an opaque, untransportable value), ``NN`` (``out is not None``) and ``H``
(SHA-256 of a huge output's memo-free pickle).
"""

from __future__ import annotations

import json
import os
import sys
import time

_CONTAINER_TAGS = {list: "L", tuple: "T", set: "S", frozenset: "F"}
_MAX_DEPTH = 200
_HUGE_OUTPUT_BYTES = 1 << 20
_CONTAINERS = (str, bytes, list, tuple, set, frozenset, dict)


# --------------------------------------------------------------------------------------------------
# The codec (both ends)
# --------------------------------------------------------------------------------------------------
def encode_value(x, _d=0, untrusted=False):
    """Strict for inputs we send; with untrusted=True (values returned by the program) builtin
    subclasses become their base type, numpy values stay numpy, anything else becomes an opaque
    marker that compares unequal."""
    t = type(x)
    if t is int and x.bit_length() > 4000:
        return ["I", format(x, "x")]
    if x is None or t is bool or t is int or t is float or t is str:
        return x
    if _d > _MAX_DEPTH:
        if untrusted:
            return ["U", "too-deep"]
        raise ValueError("nesting too deep")
    tag = _CONTAINER_TAGS.get(t)
    if tag:
        return [tag, [encode_value(i, _d + 1, untrusted) for i in x]]
    if t is dict:
        return ["D", [[encode_value(k, _d + 1, untrusted), encode_value(v, _d + 1, untrusted)] for k, v in x.items()]]
    if t is complex:
        return ["C", x.real, x.imag]
    if t is bytes:
        return ["B", x.hex()]
    if not untrusted:
        raise TypeError("unsupported type " + t.__name__)
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(x, np.ndarray):
            if x.dtype.kind in "biufcU":
                return ["A", x.dtype.str, encode_value(x.tolist(), _d + 1, True)]
            return ["U", "numpy.ndarray[%s]" % x.dtype]
        if isinstance(x, np.generic):
            return ["G", x.dtype.str, encode_value(x.item(), _d + 1, True)]
    for base in (bool, int, float, str, complex, bytes):
        if isinstance(x, base):
            return encode_value(base(x), _d + 1, True)
    for base, tag in _CONTAINER_TAGS.items():
        if isinstance(x, base):
            return [tag, [encode_value(i, _d + 1, True) for i in base.__iter__(x)]]
    if isinstance(x, dict):
        return ["D", [[encode_value(k, _d + 1, True), encode_value(v, _d + 1, True)] for k, v in dict.items(x)]]
    return ["U", t.__module__ + "." + t.__qualname__]


def decode_value(x, decode_tag=None):
    """Inverse of encode_value; ``decode_tag(x, decode)`` decodes the tags only outputs carry (host side)."""
    if type(x) is not list:
        return x
    tag = x[0]
    if tag == "L":
        return [decode_value(i, decode_tag) for i in x[1]]
    if tag == "T":
        return tuple(decode_value(i, decode_tag) for i in x[1])
    if tag == "S":
        return {decode_value(i, decode_tag) for i in x[1]}
    if tag == "F":
        return frozenset(decode_value(i, decode_tag) for i in x[1])
    if tag == "D":
        return {decode_value(k, decode_tag): decode_value(v, decode_tag) for k, v in x[1]}
    if tag == "C":
        return complex(x[1], x[2])
    if tag == "B":
        return bytes.fromhex(x[1])
    if tag == "I":
        return int(x[1], 16)
    if decode_tag is not None:
        return decode_tag(x, lambda v: decode_value(v, decode_tag))
    raise ValueError(f"bad tag {tag!r}")


# --------------------------------------------------------------------------------------------------
# Outputs: encoded in the sandbox, decoded by the host
# --------------------------------------------------------------------------------------------------
def _pickle_memo_free(x):
    import io
    import pickle

    b = io.BytesIO()
    p = pickle.Pickler(b, protocol=4)
    p.fast = True  # no memo: equal acyclic values give equal bytes whatever objects they share
    p.dump(x)
    return b.getvalue()


def encode_output(out, set_eq=False):
    """Outputs are sent as tagged JSON; an output whose (memo-free) pickle exceeds 1 MiB is sent as
    a SHA-256 of that pickle instead (exact structural equality; for set-compared tasks, of the
    sorted distinct element pickles): transporting e.g. Mbpp/255's 1.7M-tuple lists is infeasible."""
    import hashlib

    try:
        if set_eq:
            parts = sorted({_pickle_memo_free(e) for e in out})
            data = b"".join(len(x).to_bytes(8, "little") + x for x in parts)
        else:
            data = _pickle_memo_free(out)
    except Exception:
        data = None
    if data is not None and len(data) > _HUGE_OUTPUT_BYTES:
        return ["H", hashlib.sha256(data).hexdigest(), "set" if set_eq else "value"]
    return encode_value(out, untrusted=True)


class Opaque:
    """A value the program returned that cannot be transported; equal to nothing but itself."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str):
        self.type_name = type_name

    def __repr__(self):
        return f"<opaque {self.type_name}>"


class NotNone:
    """For MBPP_OUTPUT_NOT_NONE_TASKS: the program returned a non-bool; carries `out is not None`."""

    __slots__ = ("flag",)

    def __init__(self, flag: bool):
        self.flag = bool(flag)

    def __repr__(self):
        return f"<not-None={self.flag}>"


class Digest:
    """A huge output, transported as a hash of its canonical (memo-free) pickle."""

    __slots__ = ("hexdigest", "kind")

    def __init__(self, hexdigest: str, kind: str):
        self.hexdigest, self.kind = str(hexdigest), str(kind)

    def __eq__(self, other):
        return isinstance(other, Digest) and (self.hexdigest, self.kind) == (other.hexdigest, other.kind)

    def __hash__(self):
        return hash(self.hexdigest)

    def __repr__(self):
        return f"<digest {self.kind} {self.hexdigest[:12]}>"


def _decode_output_tag(x, decode):
    tag = x[0]
    if tag == "H":
        return Digest(x[1], x[2])
    if tag in ("A", "G"):
        import numpy as np

        val = decode(x[2])
        return np.array(val, dtype=np.dtype(x[1])) if tag == "A" else np.dtype(x[1]).type(val)
    if tag == "NN":
        return NotNone(x[1])
    if tag == "U":
        return Opaque(str(x[1]))
    raise ValueError(f"bad tag {tag!r}")


def decode_output(x):
    """An output the program returned (host side): numpy values, digests and markers included."""
    return decode_value(x, _decode_output_tag)


def decode_output_or_opaque(x):
    try:
        return decode_output(x)
    except Exception:  # malformed output from the program: never equal to anything
        return Opaque("undecodable")


# --------------------------------------------------------------------------------------------------
# The harness (sandbox side)
# --------------------------------------------------------------------------------------------------
def _load_evalplus_utils(path):
    """evalplus's eval/utils.py (time_limit, swallow_io, reliability_guard) by path, else stand-ins
    for the first two and no guard."""
    if path:
        try:
            import importlib.util

            spec = importlib.util.spec_from_file_location("_antisd_evalplus_eval_utils", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
        except Exception:
            pass
    import contextlib
    import io
    import signal

    class TimeoutException(Exception):
        pass

    @contextlib.contextmanager
    def time_limit(seconds):
        def handler(signum, frame):
            raise TimeoutException("Timed out!")

        signal.setitimer(signal.ITIMER_REAL, seconds)
        signal.signal(signal.SIGALRM, handler)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    @contextlib.contextmanager
    def swallow_io():
        s = io.StringIO()
        with contextlib.redirect_stdout(s), contextlib.redirect_stderr(s):
            yield

    class Utils:
        pass

    m = Utils()
    m.TimeoutException, m.time_limit, m.swallow_io, m.reliability_guard = TimeoutException, time_limit, swallow_io, None
    return m


def _run_split(split, fn, mode, not_none, set_eq, U, emit):
    """Call fn on each input of the split; returns the result rows, or None after a ground-truth error."""
    res = []
    start = time.monotonic()
    tls = split.get("time_limits")
    aborted = False
    for i, raw in enumerate(split["inputs"]):
        if aborted or (split.get("timeout") and time.monotonic() - start > split["timeout"]):
            res.append(["timeout"])
            aborted = True
            continue
        inp = decode_value(raw)
        try:
            if mode == "gt":
                t0 = time.time()
                out = fn(*inp)
                dt = time.time() - t0
                enc = (out is not None) if not_none else encode_output(out, set_eq)
                res.append(["ok", enc, dt])
                continue
            with U.time_limit(tls[i]):
                with U.swallow_io():
                    out = fn(*inp)
                    if set_eq and not not_none and not isinstance(out, _CONTAINERS):
                        try:  # evalplus does set(out): iterate generators/maps under the limit
                            out = list(out)
                        except TypeError:
                            pass
            # encoding is not the program's time (the reference times exclude it)
            if not_none:
                enc = bool(out) if isinstance(out, bool) else ["NN", out is not None]
            else:
                enc = encode_output(out, set_eq)
            res.append(["ok", enc])
        except U.TimeoutException:
            res.append(["timeout"])
            aborted = True
        except BaseException as e:
            if mode == "gt":
                emit({"gt_error": "%s on input %d of %s: %s" % (type(e).__name__, i, split["name"], str(e)[:200])})
                return None
            res.append(["err", type(e).__name__])
    return res


def main():
    """Job keys: mode ("gt": canonical solution, records outputs and times; "check": a sample, under
    per-input time limits), code, entry_point, guard, not_none, set_eq, evalplus_utils, splits."""
    job = json.loads(sys.stdin.buffer.read())
    out_fd = os.dup(1)
    nul = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(nul, fd)
    _write = os.write

    def emit(obj):
        data = (json.dumps(obj) + "\n").encode()
        while data:
            n = _write(out_fd, data)
            data = data[n:]

    U = _load_evalplus_utils(job.get("evalplus_utils"))
    mode = job["mode"]
    if job.get("guard") and U.reliability_guard is not None:
        U.reliability_guard()
    g = {}
    try:
        with U.swallow_io():
            exec(job["code"], g)
            fn = g[job["entry_point"]]
    except BaseException as e:
        emit({"exec_error": "%s: %s" % (type(e).__name__, str(e)[:300])})
        return
    emit({"ready": True})
    for split in job["splits"]:
        res = _run_split(split, fn, mode, job.get("not_none"), job.get("set_eq"), U, emit)
        if res is None:
            return
        emit({"split": split["name"], "results": res})


if __name__ == "__main__":
    main()
