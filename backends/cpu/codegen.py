"""LLVM IR text → object code with llvmlite alone, here or in a helper process beside this one.

llvmlite serializes every LLVM call of a process behind one lock, so threads never compile two
kernels at once, and a thread that only loads a compiled object waits for another's whole
compile. `CodegenHelpers` starts this file as a script in a few processes (it imports llvmlite
only, no lmc and no numpy: each is ready in ~0.1 s) and hands them modules over pipes
(jit.JitEngine._codegen); the engine's own process then makes only short LLVM calls (loading
objects). Both sides build the same target machine from the same CPU name, features and opt
level, so the object code is the same whichever side compiled it.

Frames on the pipes: a 4-byte big-endian length, then the bytes. A request is two frames (a
JSON header {"name", "vectorize"}, the IR text); a reply is two (a JSON header {"ok", "error"},
the object code).
"""
from __future__ import annotations

import json
import os
import queue
import struct
import subprocess
import sys
import threading

import llvmlite.binding as llvm

_LENGTH = struct.Struct(">I")


def target_machine(cpu: str, features: str, opt_level: int):
    return llvm.Target.from_triple(llvm.get_process_triple()).create_target_machine(
        cpu=cpu, features=features, opt=opt_level, reloc="default", codemodel="jitdefault")


def parse(name: str, llvm_ir: str, machine):
    """Parsed and verified (RuntimeError with LLVM's message if not), for `machine`."""
    module = llvm.parse_assembly(llvm_ir)
    module.verify()
    module.name = name
    module.triple = machine.triple
    module.data_layout = str(machine.target_data)
    return module


def optimize(module, machine, opt_level: int, vectorize: bool) -> None:
    pto = llvm.create_pipeline_tuning_options(speed_level=opt_level)
    pto.loop_vectorization = pto.slp_vectorization = pto.loop_unrolling = vectorize
    builder = llvm.create_pass_builder(machine, pto)
    builder.getModulePassManager().run(module, builder)


def _send(stream, *frames: bytes) -> None:
    stream.write(b"".join(_LENGTH.pack(len(f)) + f for f in frames))
    stream.flush()


def _receive(stream, count: int) -> list[bytes] | None:
    """`count` frames, or None at the end of the stream."""
    frames = []
    for _ in range(count):
        head = stream.read(_LENGTH.size)
        if len(head) < _LENGTH.size:
            return None
        (size,) = _LENGTH.unpack(head)
        body = stream.read(size)
        if len(body) < size:
            return None
        frames.append(body)
    return frames


class _Helper:
    """One helper process compiling for (cpu, features, opt_level), one module at a time."""

    def __init__(self, cpu: str, features: str, opt_level: int):
        self._proc = subprocess.Popen(  # -P: the script's folder (this package) stays off sys.path
            [sys.executable, "-P", __file__, cpu, features, str(opt_level)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def compile(self, name: str, llvm_ir: str, vectorize: bool) -> tuple[bool, bytes | None]:
        """(alive, object code or None if LLVM rejected the module)."""
        try:
            header = json.dumps({"name": name, "vectorize": vectorize}).encode()
            _send(self._proc.stdin, header, llvm_ir.encode())
            reply = _receive(self._proc.stdout, 2)
            ok = reply is not None and json.loads(reply[0])["ok"]
        except (OSError, ValueError):  # a broken pipe, a garbled reply: the helper is lost
            reply = None
        if reply is None:
            return False, None
        return True, reply[1] if ok else None

    def close(self) -> None:
        """End the helper (it exits when its input closes)."""
        try:
            self._proc.stdin.close()
            self._proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()


class CodegenHelpers:
    """`size` helper processes; `compile` takes an idle one (waiting for one if all are busy).

    It returns None when LLVM rejected the module or the helper died (a dead helper's slot
    stays, as a None that sends every later caller back): the caller then compiles in its own
    process, which gives LLVM's own error (a helper is a speed-up, never a requirement)."""

    def __init__(self, cpu: str, features: str, opt_level: int):
        self._args, self._pid = (cpu, features, opt_level), os.getpid()
        self._idle: queue.SimpleQueue[_Helper | None] = queue.SimpleQueue()
        self._all: list[_Helper] = []
        self._lock = threading.Lock()

    def ensure(self, size: int) -> None:
        """Start helpers until there are `size` (none more if one cannot start)."""
        with self._lock:
            while len(self._all) < size:
                try:
                    helper = _Helper(*self._args)
                except OSError:
                    return
                self._all.append(helper)
                self._idle.put(helper)

    def compile(self, name: str, llvm_ir: str, vectorize: bool) -> bytes | None:
        if not self._all or os.getpid() != self._pid:  # a forked child shares the pipes
            return None
        helper = self._idle.get()
        obj = None
        try:
            if helper is not None:
                alive, obj = helper.compile(name, llvm_ir, vectorize)
                if not alive:
                    helper.close()
                    helper = None
        finally:
            self._idle.put(helper)
        return obj

    def close(self) -> None:
        for helper in self._all:
            helper.close()


def serve(cpu: str, features: str, opt_level: int) -> None:
    """The helper's loop: requests on stdin, replies on stdout, until stdin closes."""
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    llvm.initialize_native_asmparser()
    machine = target_machine(cpu, features, opt_level)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while (request := _receive(stdin, 2)) is not None:
        header = json.loads(request[0])
        try:
            module = parse(header["name"], request[1].decode(), machine)
            optimize(module, machine, opt_level, header["vectorize"])
            obj, error = machine.emit_object(module), ""
        except RuntimeError as exc:
            obj, error = b"", str(exc)
        _send(stdout, json.dumps({"ok": not error, "error": error}).encode(), obj)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
