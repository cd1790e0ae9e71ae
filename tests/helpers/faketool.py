"""A tiny tool built on bp_common, used by the library's own tests (pipes, signals, locks).

It is not a stub of a real tool: it exercises exactly the plumbing every real tool uses.
"""
import sys
import time

from bp_common import manifest
from bp_common.cli import add_subparsers, entry, make_parser
from bp_common.errors import BpError
from bp_common.io import OutputLock, atomic_write

TOOL = "bp-fake"


def get_parser():
    p = make_parser(TOOL, "test tool for bp_common")
    sub = add_subparsers(p, TOOL)
    f = sub.add_parser("fail", help="fail in a chosen way")
    f.add_argument("--code", default=None, help="raise BpError with this code")
    f.add_argument("--exc", default=None, help="raise this kind of exception: keyboard, memory, oserror-nospc, "
                   "permission, bug, wrapped, sigterm-wait")
    c = sub.add_parser("consume", help="read a manifest and pass a new one on")
    c.add_argument("input", nargs="?", help="manifest")
    c.add_argument("--expect", default="dataset,vram,report", help="kinds accepted")
    e = sub.add_parser("emit", help="print a manifest of a kind")
    e.add_argument("--kind", default="report")
    e.add_argument("--value", default="x")
    e.add_argument("--flag", action="store_true")
    e.add_argument("--number", type=int, default=1)
    lk = sub.add_parser("lock", help="hold the output lock until stdin closes")
    lk.add_argument("-o", "--output", required=True)
    w = sub.add_parser("write", help="atomically write N MiB slowly")
    w.add_argument("path")
    w.add_argument("--mib", type=int, default=64)
    return p


def run(args, ctx):
    if args.command == "fail":
        if args.code:
            raise BpError(args.code, f"requested failure {args.code}", details={"hf": "hf_secretsecret123"})
        exc = args.exc
        if exc == "keyboard":
            raise KeyboardInterrupt
        if exc == "memory":
            raise MemoryError
        if exc == "oserror-nospc":
            import errno
            raise OSError(errno.ENOSPC, "No space left on device")
        if exc == "permission":
            raise PermissionError(13, "Permission denied", "/root/x")
        if exc == "sigterm-wait":
            sys.stderr.write("ready\n")
            sys.stderr.flush()
            sys.stdin.read()
            return None
        if exc == "wrapped":  # a catalogued error caused by a library exception that carries secrets
            try:
                raise ConnectionError("GET https://user:pw12345678@hub.example/x with hf_abcdefghijkl1 failed")
            except ConnectionError as cause:
                raise BpError("HUB_UNREACHABLE", "hub unreachable") from cause
        raise RuntimeError("boom Bearer abcdefgh12345 hf_abcdefghijkl1 https://user:pw12345678@host/x")
    if args.command == "consume":
        inp = manifest.read_input(args.input, args.expect.split(","), TOOL)
        m = manifest.new_manifest("report", TOOL, None, inputs=[inp.manifest.ref()], seen=inp.manifest.kind)
        return m
    if args.command == "emit":
        return manifest.new_manifest(args.kind, TOOL, None, value=args.value, flag=args.flag, number=args.number,
                                     log_format=args.log_format)
    if args.command == "lock":
        with OutputLock(args.output):
            sys.stderr.write("locked\n")
            sys.stderr.flush()
            sys.stdin.read()
        return manifest.new_manifest("report", TOOL, None, locked=True)
    if args.command == "write":
        def slow(fh):
            block = b"x" * (1 << 20)
            for i in range(args.mib):
                fh.write(block)
                if i == 1:
                    fh.flush()
                    sys.stderr.write("writing\n")
                    sys.stderr.flush()
                    time.sleep(30)  # the test kills us here; it does not wait on this sleep
        atomic_write(args.path, slow)
        return manifest.new_manifest("report", TOOL, None, written=args.path)
    raise BpError("INPUT_USAGE", "no command given")


main = entry(TOOL, get_parser, run)

if __name__ == "__main__":
    main()
