"""The ``streamtsm`` command: parses arguments, calls library functions, maps errors to exit codes.

Exit codes: 0 success, 2 bad input (one line on stderr; the traceback only with --debug), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from .errors import StreamTSMError

log = logging.getLogger("streamtsm")


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import get_spec, list_models

    rows = [("name", "kind", "input", "frames", "description")]
    for name in list_models(kind=args.kind):
        spec = get_spec(name)
        d = spec.defaults
        frames = f"{d.get('num_segments', 8)} seg" if spec.kind == "online" or "clip_len" not in d else \
            f"{d['clip_len']}x{d.get('frame_interval', 1)}"
        rows.append((name, spec.kind, str(d.get("input_size", 224)), frames, spec.description))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4])
    return 0


def _cmd_listen(args: argparse.Namespace) -> int:
    from .publish import listen

    listen(args.connect, args.topic or ["streamtsm"], as_json=args.json, out=sys.stdout,
           max_messages=args.max_messages, timeout=args.timeout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamtsm", description="Streaming action recognition for live cameras.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the registered models")
    p.add_argument("--kind", choices=["online", "clip"], help="only models of this kind")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("listen", help="print the messages a recognizer publishes")
    p.add_argument("--connect", default="tcp://127.0.0.1:5556", help="endpoint of the publisher or broker")
    p.add_argument("--topic", action="append", help="topic prefix to subscribe to (repeatable; default: all)")
    p.add_argument("--json", action="store_true", help="print raw JSON payloads, one per line")
    p.add_argument("--max-messages", type=int, help="exit after this many messages")
    p.add_argument("--timeout", type=float, help="exit when no message arrives for this many seconds")
    p.set_defaults(func=_cmd_listen)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except StreamTSMError as e:
        if args.debug:
            raise
        print(f"streamtsm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
