"""`fastnn` (the installed script, or `python -m fastnn` outside the source tree): `info` prints what was built and what runs;
`bench` times every op against NumPy and PyTorch (see fastnn.bench)."""
from __future__ import annotations

import argparse
import json
import sys


def _print_info(value, indent=0):
    """A dict as aligned `key: value` lines, nested dicts indented below their key."""
    width = max((len(str(k)) for k in value), default=0)
    for key, item in value.items():
        pad = " " * indent
        if isinstance(item, dict) and item:
            print(f"{pad}{key}:")
            _print_info(item, indent + 2)
        else:
            if isinstance(item, (list, tuple)):
                item = ", ".join(map(str, item)) or "(none)"
            print(f"{pad}{str(key) + ':':<{width + 1}} {item}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except where there is none (None, or an off switch)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _parser():
    parser = argparse.ArgumentParser(prog="fastnn", description=__doc__, formatter_class=_HelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = commands.add_parser("info", formatter_class=_HelpFormatter, help="print fastnn.info(): version, compiler, ISA paths, threads")
    info.add_argument("--json", action="store_true", help="print it as JSON")

    from fastnn.bench import OPS
    from fastnn.bench.extra import extra_ops
    from fastnn.bench.isa import PATHS
    extra = extra_ops()
    bench = commands.add_parser(
        "bench", formatter_class=_HelpFormatter, help="time every op against NumPy (and PyTorch), after checking it against the oracle",
        description="Check each op against the float64 oracle, then time fastnn, NumPy and PyTorch "
                    "(when it imports) side by side; a Markdown table goes to stdout, progress to "
                    "stderr. Exits 1 when a fastnn result fails its check.")
    bench.add_argument("--quick", action="store_true",
                       help="fewer repeats, the largest cases left out (about a minute on 2 cores)")
    bench.add_argument("--op", nargs="+", action="extend", metavar="NAME", choices=OPS + tuple(extra),
                       help=f"only these ops (any of: {', '.join(OPS)}; default: all)"
                            + "".join(f"; {name}: {text}" for name, (_, text) in extra.items()))
    bench.add_argument("--isa", choices=PATHS + ("all",),
                       help="run fastnn on this ISA path (all: every path this CPU supports, one table "
                            "each), with NumPy's OpenBLAS and PyTorch forced onto the same instruction "
                            "set, each path in its own process (default: the best path, peers at "
                            "their best)")
    bench.add_argument("--json", metavar="FILE", help="also write rows, limits, info and date to FILE")
    bench.add_argument("--threads", metavar="N[,N...]",
                       help="thread counts for fastnn, NumPy's BLAS and PyTorch, each with its own limits "
                            "and table, then a scaling table (default: 1 and fastnn's count)")
    bench.add_argument("--plot", metavar="FILE.png",
                       help="also draw a roofline chart of the rows (needs matplotlib: the `plot` extra)")
    bench.add_argument("--no-torch", action="store_true", help="skip PyTorch even when it imports")
    bench.add_argument("--list", action="store_true", help="list the cases and exit")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import fastnn

    if args.command == "info":
        info = fastnn.info()
        if args.json:
            print(json.dumps(info, indent=2, default=str))
        else:
            _print_info(info)
        return 0

    from fastnn import bench
    extra = bench.extra.extra_ops()
    chosen_extra = [op for op in (args.op or ()) if op in extra]
    if args.list:
        for name in chosen_extra:
            print(f"{name:<20} {'(its own runner)':<40} {'':<15} {extra[name][1]}")
        if chosen_extra and len(chosen_extra) == len(args.op):
            return 0
        for case in bench.select([op for op in args.op or () if op not in extra], args.quick, available=False):
            where = {"full": "full run only", "quick": "--quick only"}.get(case.only, "")
            if not case.available():
                where = f"skipped: no fastnn.{case.requires}"
            print(f"{case.op:<20} {case.label:<40} {where:<15} {case.notes}")
        return 0
    if args.isa:
        try:
            paths = bench.isa.resolve(args.isa)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        rest = _without(sys.argv[1:] if argv is None else argv, {"--isa": 1, "--json": 1, "--plot": 1}, "bench")
        return bench.isa.run_paths(paths, rest, json_path=args.json, plot_path=args.plot)
    status = 0
    for op in chosen_extra:
        status = max(status, extra[op][0](args))
    if chosen_extra:
        args.op = [op for op in args.op if op not in extra]
        if not args.op:
            return status
    threads = None
    if args.threads is not None:
        try:
            threads = bench.parse_threads(args.threads)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
    if args.plot and not bench.have_matplotlib():
        # Checked before anything runs: a long bench must not end without its chart.
        print(f"--plot {args.plot}: matplotlib is not installed (pip install matplotlib, or fastnn's "
              "`plot` extra); "
              "nothing was run", file=sys.stderr)
        return 2
    results = bench.run(ops=args.op, quick=args.quick, threads=threads, json_path=args.json,
                        torch=None if args.no_torch else "auto", plot_path=args.plot)
    return max(status, 0 if all(row["ok"] for run in results["runs"] for row in run["rows"]) else 1)


def _without(argv, options, command):
    """argv after `command`, less each option of `options` (name -> number of values, also as
    --name=value)."""
    argv = list(argv)
    if command in argv:
        argv = argv[argv.index(command) + 1:]
    kept, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in options:
            skip = 0 if "=" in arg else options[name]
            continue
        kept.append(arg)
    return kept


if __name__ == "__main__":
    sys.exit(main())
