"""The ``multipy`` command (also ``python -m multipy``).

``multipy demo``       the main job: ResNet-18 on N interpreters vs plain threads
``multipy examples``   write the torch::deploy example archives
``multipy inspect``    list an archive's modules, pickles, resources, externs (runs nothing)
``multipy info``       Python, torch, capabilities and which backends can run here
``multipy bench``      deploy_benchmark: strategies x thread counts, CSV, table, plot
``multipy serve``      the Open Inference Protocol (KServe v2 REST) over N interpreters

Errors a user can cause (a missing file, a bad option value, a backend that
cannot run here) print one ``multipy: error: ...`` line and exit non-zero,
without a traceback.  torch is imported only by the commands that need it.

Example:
    $ multipy inspect /tmp/ex/simple.pt
    $ multipy bench smallops --threads 1,2 --seconds 1 --csv out.csv --plot out.png
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

_STRATEGY_NAMES = ("limit", "one_python", "multi_python", "jit", "threads", "process_pool")
_BACKENDS = ("process", "thread", "subinterpreter", "auto")


class UsageError(Exception):
    """A mistake on the command line or in the files it names: one line, exit 2."""


class _Failure(Exception):
    """A command that ran but found something wrong, e.g. outputs that differ: exit 1."""


# ---------------------------------------------------------------- argument types
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected more than 0, got {text}")
    return value


def _int_list(text: str) -> list[int]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated counts like 1,2,4, got {text!r}")
    return list(dict.fromkeys(_positive_int(part) for part in parts))


def _module_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names or not all(n.replace(".", "").replace("_", "").isalnum() for n in names):
        raise argparse.ArgumentTypeError(f"expected module names separated by commas, got {text!r}")
    return names


def _strategy_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in _STRATEGY_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown strategy {', '.join(unknown) or repr(text)}; "
            f"choose from {','.join(_STRATEGY_NAMES)}")
    return list(dict.fromkeys(names))


_SERVE_OPTIONS = (  # flag, type, metavar, help; each is a ServeOptions field
    ("--max-batch-size", _positive_int, "N", "most requests grouped into one call (default: 1)"),
    ("--max-batch-delay-ms", float, "MS", "longest a batch waits for more requests while "
     "the interpreters are busy (default: 2)"),
    ("--max-queue", _positive_int, "N", "requests per model waiting for an interpreter; "
     "more are refused with 429 (default: 64)"),
    ("--request-timeout", _positive_float, "S", "deadline of a request, 504 past it; a "
     "request may ask for less (default: 30)"),
    ("--max-request-bytes", _positive_int, "B", "largest body accepted, 413 beyond "
     "(default: 64 MiB)"),
    ("--workers-per-model", _positive_int, "N", "interpreters one model may use at once "
     "(default: all)"),
    ("--drain-timeout", _positive_float, "S", "how long SIGTERM waits for requests in "
     "flight (default: 30)"),
)


# ----------------------------------------------------------------------- parser
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multipy",
        description="Eager PyTorch models on a pool of independent Python interpreters.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"multipy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="why multipy: two models on N interpreters vs plain threads",
                          description="Run a small-op model and all-MiniLM-L6-v2 (a Hugging Face "
                          "model) on N interpreters, check their outputs against eager PyTorch, "
                          "compare throughput with N plain threads sharing one model and with "
                          "the machine's limit, measure memory against N eager processes, and "
                          "plot it all.")
    demo.add_argument("--interpreters", type=_positive_int, default=os.cpu_count() or 1,
                      metavar="N", help="interpreters and host threads (default: %(default)s, "
                      "the number of cores)")
    demo.add_argument("--seconds", type=_positive_float, default=2.0, metavar="S",
                      help="measurement window per row (default: %(default)s)")
    demo.add_argument("--out", metavar="DIR",
                      help="where to write the packages (default: a cache directory)")
    demo.add_argument("--plot", metavar="FILE.png", default="multipy-demo.png",
                      help="where to save the plot (default: %(default)s)")
    demo.add_argument("--no-real-model", dest="real_model", action="store_false",
                      help="run the small-op model only")
    demo.add_argument("--backend", choices=_BACKENDS, default="process")

    examples = sub.add_parser("examples", help="write the example archives",
                              description="Write the torch::deploy example models as "
                              "torch.package archives (<name>.pt and <name>_jit.pt).")
    examples.add_argument("--out", required=True, metavar="DIR")
    examples.add_argument("--only", nargs="+", action="extend", metavar="NAME",
                          help="examples to write (default: all)")

    package = sub.add_parser(
        "package", help="write a model as a torch.package archive (or show what that would do)",
        description="Call FACTORY from MODULE (MODULE:FACTORY, e.g. my_model:build) and write "
        "what it returns to OUT as a torch.package archive. Every module the object needs is "
        "interned (copied in), externed (imported where it runs) or mocked (a stub); the "
        "report lists each one and the pattern or rule that chose it.")
    package.add_argument("factory", metavar="MODULE:FACTORY")
    package.add_argument("-o", "--out", required=True, metavar="OUT.pt")
    for action, what in (("intern", "copy into the archive (your model's code)"),
                         ("extern", "import from the interpreters' environment (libraries)"),
                         ("mock", "replace by a stub (imports not needed to run)")):
        package.add_argument(f"--{action}", action="append", default=[], metavar="PATTERN",
                             help=f"modules to {what}; a glob like 'transformers.**'; repeatable")
    package.add_argument("--dry-run", action="store_true",
                         help="report what would be interned, externed and mocked; write nothing")

    inspect = sub.add_parser("inspect", help="list what an archive contains, running none of it",
                             description="List the modules, pickles, resources and externs "
                             "of a torch.package archive without executing any of it.")
    inspect.add_argument("package", metavar="PKG")

    sub.add_parser("info", help="Python, torch, capabilities and available backends",
                   description="Show this Python's capabilities and which backends can run.")

    bench = sub.add_parser(
        "bench", help="benchmark strategies (deploy_benchmark)",
        description="Measure throughput of each strategy at each thread count, as "
        "torch::deploy's deploy_benchmark did.  PKG is a torch.package archive with "
        "model/model.pkl and model/example.pkl, or an example name (smallops, resnet, ...).  "
        "`multipy bench serve` measures the HTTP server; `multipy bench ray` the Ray Serve "
        "application (latency over `multipy serve`, memory of two replicas).")
    bench.add_argument("packages", nargs="*", metavar="PKG")
    bench.add_argument("--max-interpreters", type=_positive_int, default=os.cpu_count() or 1,
                       metavar="N", help="most interpreters / processes (default: %(default)s)")
    bench.add_argument("--max-threads", type=_positive_int, metavar="N",
                       help="end of the default thread sweep (default: --max-interpreters)")
    bench.add_argument("--threads", type=_int_list, metavar="1,2,4",
                       help="thread counts (default: 1,2,4,8,16,32,40 up to --max-threads)")
    bench.add_argument("--seconds", type=_positive_float, default=2.0, metavar="S",
                       help="measurement window per row (default: %(default)s)")
    bench.add_argument("--strategies", type=_strategy_list, default=list(_STRATEGY_NAMES),
                       metavar="LIST", help=f"comma-separated (default: {','.join(_STRATEGY_NAMES)})")
    bench.add_argument("--csv", metavar="FILE", help="write deploy_benchmark's CSV here")
    bench.add_argument("--plot", metavar="FILE.png", help="plot throughput against threads")
    bench.add_argument("--backend", choices=_BACKENDS, default="process")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="where models and inputs live (default: %(default)s); on cuda "
                       "limit and process_pool are skipped")
    bench.add_argument("--batch", type=_positive_int, default=1, metavar="N",
                       help="example inputs repeated along dim 0 to N rows; one work item "
                       "is one call on N inputs (default: %(default)s)")
    bench.add_argument("--out", metavar="DIR",
                       help="where example archives are written (default: a cache directory)")
    bench.add_argument("--overhead", action="store_true",
                       help="per-call dispatch overhead over a direct call (identity model)")
    bench.add_argument("--overhead-calls", type=_positive_int, default=2000, metavar="N",
                       help="sequential calls per input shape (default: %(default)s)")
    bench.add_argument("--dispatch", action="store_true",
                       help="calls/s and host CPU per call, N host threads -> 1 no-op "
                       "interpreter (N from --threads, default 1,4,16), beside a bare "
                       "os.pipe ping-pong between two Python processes")
    bench.add_argument("--memory", action="store_true",
                       help="PSS of 4 interpreters of a 200 MB model vs a tiny one")
    bench.add_argument("--memory-mb", type=_positive_float, default=200.0, metavar="MB",
                       help=argparse.SUPPRESS)
    bench.add_argument("--connections", type=_int_list, default=[1, 16, 64], metavar="1,16,64",
                       help="`bench serve`: concurrent connections of the load generator "
                       "(default: 1,16,64)")
    bench.add_argument("--rounds", type=_positive_int, default=3, metavar="N",
                       help="`bench serve`: rounds over the servers, interleaved; each row is "
                       "the median of its N windows of --seconds/N s; `--dispatch`: rounds over "
                       "the thread counts and the pipe ping-pong, the same way; `--overhead`: rounds over the "
                       "input shapes, direct and through the interpreter (default: %(default)s)")
    bench.add_argument("--peers", default="litserve,mosec", metavar="LIST",
                       help="`bench serve`: peers served beside multipy, from a throwaway venv "
                       "(default: %(default)s; 'none' for none)")
    bench.add_argument("--peer-venv", metavar="DIR",
                       help="`bench serve`: where that venv goes (default: the cache)")
    bench.add_argument("--async", dest="async_", action="store_true",
                       help="one event-loop thread of 64 concurrent acall tasks vs 16 blocking "
                       "host threads (--model on --max-interpreters interpreters)")
    bench.add_argument("--batching", action="store_true",
                       help="batched vs unbatched calls from --callers threads of batch-1 "
                       "requests; every batched answer is checked against the unbatched one")
    bench.add_argument("--callers", type=_int_list, default=[1, 16, 64], metavar="1,16,64",
                       help="caller threads for --batching (default: 1,16,64)")
    bench.add_argument("--model", default="smallops", metavar="PKG",
                       help="package or example for --async and --batching (default: %(default)s)")
    bench.add_argument("--startup", action="store_true",
                       help="time InterpreterManager(4) + a package + every interpreter serving, "
                       "against a fresh `import torch`")
    bench.add_argument("--ray-requests", type=_positive_int, default=500, metavar="N",
                       help="`bench ray`: one client's requests to each server (default: "
                       "%(default)s)")
    bench.add_argument("--preload", type=_module_list, default=(), metavar="MOD[,MOD]",
                       help="with --startup: also time --max-interpreters interpreters with "
                       "these preload= modules against one; with --pss: the modules to share "
                       "(default: the archive's externs)")
    bench.add_argument("--pss", metavar="PKG",
                       help="PSS of N interpreters holding PKG's model against N eager "
                       "processes, N from --threads (default: 1 and --max-interpreters)")

    serve = sub.add_parser(
        "serve", help="serve models over the Open Inference Protocol (KServe v2 REST)",
        description="Serve torch.package models over HTTP with the Open Inference Protocol "
        "(KServe v2 REST, JSON and Triton's binary tensors) on a pool of interpreters.  "
        "NAME=PATH serves PATH's model/model.pkl as NAME; PATH:package/resource names "
        "another pickle.  SIGTERM drains requests in flight and exits 0.")
    serve.add_argument("models", nargs="*", metavar="NAME=PATH")
    serve.add_argument("--config", metavar="FILE.json",
                       help='models and options in a file: {"models": {"NAME": "PATH"}, '
                       '"max_queue": 64, ...} (options on the command line win)')
    serve.add_argument("--interpreters", type=_positive_int, default=os.cpu_count() or 1,
                       metavar="N", help="interpreters shared by the models (default: %(default)s)")
    serve.add_argument("--backend", choices=_BACKENDS, default="process")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: %(default)s, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free one (default: 8000)")
    for flag, kind, metavar, text in _SERVE_OPTIONS:
        serve.add_argument(flag, type=kind, metavar=metavar, default=None, help=text)
    serve.add_argument("--log-level", default="warning",
                       choices=("critical", "error", "warning", "info", "debug"))
    serve.add_argument("--ray", action="store_true",
                       help="serve as a Ray Serve application: replicas of --interpreters "
                       "interpreters each behind Serve's HTTP proxy, on a Ray instance started "
                       "on this machine or the cluster at --address (needs the ray extra)")
    serve.add_argument("--replicas", type=_positive_int, default=None, metavar="N",
                       help="with --ray: number of replicas (default: 1)")
    serve.add_argument("--address", metavar="ADDR", default=None,
                       help="with --ray: join this Ray cluster (auto, HOST:6379, "
                       "ray://HOST:10001) instead of starting Ray here")

    soak = sub.add_parser("soak", help="many host threads, mixed calls, interpreters killed "
                          "as it runs; checks every result and every leak")
    soak.add_argument("--seconds", type=_positive_float, default=60.0, metavar="S",
                      help="how long to run (default: %(default)s)")
    soak.add_argument("--threads", type=_positive_int, default=16, metavar="N",
                      help="host threads (default: %(default)s)")
    soak.add_argument("--interpreters", type=_positive_int, default=2, metavar="N",
                      help="interpreters (default: %(default)s)")
    soak.add_argument("--kill-every", type=float, default=3.0, metavar="S",
                      help="SIGKILL a random interpreter every S seconds; 0 never (default: %(default)s)")
    return parser


# --------------------------------------------------------------------- commands
def _cmd_package(args) -> int:
    import importlib

    from .package.plan import format_plan, plan_package

    module_name, sep, factory_name = args.factory.partition(":")
    if not sep or not module_name or not factory_name:
        raise UsageError(f"expected MODULE:FACTORY (e.g. my_model:build), got {args.factory!r}")
    if not args.dry_run:
        _check_dir_writable(Path(args.out).resolve().parent, "--out", must_exist=True)
    if "" not in sys.path:
        sys.path.insert(0, "")  # MODULE is looked up from the current directory, as python -m does
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UsageError(f"{module_name} has no callable {factory_name!r}")
    try:
        obj = factory()
    except Exception as exc:  # the user's code: one line, not a traceback of the CLI
        raise _Failure(f"{args.factory}() raised {type(exc).__name__}: {exc}; nothing "
                       "written") from exc
    if not callable(obj):
        print(f"note: {args.factory}() returned a {type(obj).__name__}, which cannot be "
              "called: multipy bench and serve call the archive's object as the model",
              file=sys.stderr)
    patterns = dict(intern=args.intern, extern=args.extern, mock=args.mock)
    plan = plan_package(obj, **patterns)
    print(format_plan(plan))
    if not plan.ok:
        raise _Failure(f"{len(plan.problems)} module(s) not covered by --intern, --extern or "
                       f"--mock; {'nothing would be written' if args.dry_run else 'nothing written'}")
    if args.dry_run:
        print(f"dry run: {args.out} not written")
        return 0
    from .package import save_package

    save_package(args.out, obj, **patterns)
    print(f"wrote {args.out}")
    return 0


def _cmd_inspect(args) -> int:
    from .package import format_contents, inspect_package

    try:
        contents = inspect_package(args.package)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    print(format_contents(contents))
    return 0


def _cmd_examples(args) -> int:
    from .examples import EXAMPLES, generate, jit_path

    unknown = [n for n in args.only or () if n not in EXAMPLES]
    if unknown:
        raise UsageError(f"unknown example {', '.join(unknown)}; "
                         f"choose from {', '.join(EXAMPLES)}")
    _check_dir_writable(args.out)
    for name, archive in generate(args.out, args.only).items():
        suffix = f" (+ {jit_path(archive).name})" if EXAMPLES[name].has_jit else ""
        print(f"{name}: {archive}{suffix}", flush=True)
    return 0


def _cmd_info(args) -> int:
    import platform

    from . import __version__
    from .backends.base import BackendKind
    from .backends.capabilities import detect, resolve_backend, why_unavailable
    from .errors import BackendUnavailableError

    caps = detect()
    print(f"multipy {__version__}")
    print(f"python {platform.python_version()} ({platform.python_implementation()}, "
          f"{'free-threaded' if caps.free_threaded else 'with a GIL'}) at {sys.executable}")
    try:
        import torch
    except ImportError:
        print("torch: not installed (the subinterpreter backend and torch-free work still run)")
    else:
        print(f"torch {torch.__version__}")
    print(f"cores {os.cpu_count()}")
    from .transport.channel import NATIVE_WHY

    print(f"call channel: {NATIVE_WHY}")
    print("capabilities:")
    for key, value in caps.as_dict().items():
        print(f"  {key}: {value}")
    print("backends:")
    for kind in BackendKind:
        why = why_unavailable(kind, caps)
        print(f"  {kind.value}: {'available' if why is None else 'unavailable: ' + why}")
    try:
        backend, reason = resolve_backend("auto")
    except BackendUnavailableError as exc:
        print(f"auto: none ({exc})")
    else:
        backend.close()  # creating one starts nothing; close for symmetry
        print(f"auto picks {reason}")
    return 0


def _cmd_demo(args) -> int:
    from rich.console import Console

    from .bench.demo import DemoFailure, run_demo

    if args.out:
        _check_dir_writable(args.out)
    _check_dir_writable(Path(args.plot).resolve().parent, "--plot", must_exist=True)
    try:
        run_demo(interpreters=args.interpreters, seconds=args.seconds, console=Console(),
                 err=Console(stderr=True), out=args.out, backend=args.backend,
                 plot_path=args.plot, real_model=args.real_model)
    except DemoFailure as exc:
        raise _Failure(str(exc)) from None
    return 0


def _bench_dispatch(args, out, err) -> None:
    """``--dispatch``: torch-free, so it also runs under a Python without torch
    (the subinterpreter backend's)."""
    from .bench.dispatch import dispatch_lines, measure_dispatch

    counts = tuple(args.threads or (1, 4, 16))
    with _status(err, f"dispatching no-op calls from {', '.join(map(str, counts))} host threads"):
        report = measure_dispatch(threads=counts, seconds=args.seconds, backend=args.backend,
                                  rounds=args.rounds)
    for line in dispatch_lines(report):
        out.print(line, highlight=False, soft_wrap=True)


def _cmd_bench(args) -> int:
    from rich.console import Console

    if args.dispatch and not (args.packages or args.overhead or args.memory or args.startup
                              or args.async_ or args.batching or args.pss):
        _bench_dispatch(args, Console(), Console(stderr=True))
        return 0
    from .bench import Strategy, run_sweep, table, thread_counts, write_csv
    from .bench import plot as save_plot
    from .bench.runner import progress_bar
    from .bench.targets import example_archive, resolve_target

    if args.packages[:1] == ["serve"]:
        return _bench_serve(args)
    if args.packages[:1] == ["ray"]:
        return _bench_ray(args)
    if not (args.packages or args.overhead or args.memory or args.startup or args.dispatch
            or args.async_ or args.batching or args.pss):
        raise UsageError("name at least one package or example (e.g. `multipy bench smallops`),"
                         " or pass --overhead, --dispatch, --memory, --startup, --async, "
                         "--batching or --pss")
    for option, path in (("--csv", args.csv), ("--plot", args.plot)):
        if path is not None:
            _check_dir_writable(Path(path).resolve().parent, option, must_exist=True)
    if args.out:
        _check_dir_writable(args.out)
    device = _bench_device(args.device)
    out, err = Console(), Console(stderr=True)
    strategies = [Strategy(s) for s in args.strategies]
    threads = args.threads or thread_counts(args.max_threads or args.max_interpreters)
    with _status(err, "preparing packages"):
        targets = [resolve_target(spec, out=args.out) for spec in args.packages]

    if targets:
        with progress_bar(err) as progress:
            sweep = run_sweep(targets, strategies, threads, seconds=args.seconds,
                              max_interpreters=args.max_interpreters, backend=args.backend,
                              progress=progress, device=args.device, batch=args.batch)
        where = f", {device}, batch {args.batch}" if args.device != "cpu" or args.batch > 1 else ""
        out.print(table(sweep.rows, batch=args.batch,
                        title=f"multipy bench, {args.seconds:g} s per row, "
                        f"{os.cpu_count()} cores, {args.backend} backend{where}"))
        for line in [*sweep.notes, *_limit_ratios(sweep.rows), *_threads_ratios(sweep.rows)]:
            out.print(line)
        if args.csv:
            write_csv(args.csv, sweep.rows)
            out.print(f"wrote {args.csv}")
        if args.plot:
            import torch

            save_plot(args.plot, sweep.rows,
                      title=f"multipy bench, {device}, batch {args.batch}, "
                      f"{os.cpu_count()} cores, torch {torch.__version__}",
                      ylabel="work items / s" if args.batch == 1
                      else f"work items (calls of batch {args.batch}) / s")
            out.print(f"wrote {args.plot}")
    concurrency_rows = []
    if args.async_:
        from .bench.concurrency import async_lines, measure_async

        with _status(err, f"--async: {args.model}, {args.max_interpreters} interpreters"):
            rows = measure_async(args.model, interpreters=args.max_interpreters,
                                 seconds=args.seconds, backend=args.backend)
        out.print(table(rows, baseline="blocking_threads", title=f"multipy bench --async, "
                        f"{args.seconds:g} s per row, {os.cpu_count()} cores, {args.backend} backend"))
        for line in async_lines(rows):
            out.print(line, highlight=False)
        concurrency_rows += rows
    if args.batching:
        from .bench.concurrency import batching_lines, measure_batching

        with _status(err, f"--batching: {args.model}, {args.max_interpreters} interpreters"):
            rows, checks = measure_batching(args.model, interpreters=args.max_interpreters,
                                            callers=args.callers, seconds=args.seconds,
                                            backend=args.backend)
        out.print(table(rows, baseline="unbatched", title=f"multipy bench --batching, "
                        f"{args.seconds:g} s per row, {os.cpu_count()} cores, {args.backend} backend"))
        for line in batching_lines(rows, checks):
            out.print(line, highlight=False)
        concurrency_rows += rows
    if concurrency_rows and args.csv:
        write_csv(args.csv, ([*sweep.rows] if targets else []) + concurrency_rows)
        out.print(f"wrote {args.csv}")
    if args.overhead:
        from .bench.overhead import measure_overhead, overhead_lines, overhead_table

        with _status(err, f"timing {args.overhead_calls} calls per input shape"):
            rows = measure_overhead(calls=args.overhead_calls, backend=args.backend,
                                    rounds=min(args.rounds, args.overhead_calls),
                                    device=args.device)
        out.print(overhead_table(rows))
        for line in overhead_lines(rows):
            out.print(line, highlight=False)
    if args.dispatch:
        _bench_dispatch(args, out, err)
    if args.memory:
        from .bench.memory import measure_memory, memory_lines

        with _status(err, "measuring memory") as status:
            report = measure_memory(weight_mb=args.memory_mb, backend=args.backend,
                                    on_status=lambda text: status.update(f"memory: {text}"))
        for line in memory_lines(report):
            out.print(line, highlight=False)
    if args.startup:
        from .bench.startup import measure_startup

        archive = str(example_archive("smallops", args.out))
        with _status(err, "timing start-up (fresh processes, best of 3)"):
            r = measure_startup(archive, interpreters=4)
        out.print(f"start-up: import torch {r.import_torch:.2f} s; InterpreterManager(4) + package + "
                  f"every interpreter serving {r.manager_ready:.2f} s = {r.ratio:.2f} x",
                  highlight=False,
                  soft_wrap=True)
        if args.preload:
            from .bench.startup import measure_ready

            n = args.max_interpreters
            counts = (1, n) if n > 1 else (1,)
            with _status(err, f"timing InterpreterManager(n, preload={args.preload!r}), n = "
                         f"{', '.join(map(str, counts))} (fresh processes, best of 3)"):
                ready = measure_ready(counts, preload=args.preload)
            out.print(f"ready with preload={args.preload!r}: "
                      + "; ".join(f"{k} interpreter(s) {s:.2f} s" for k, s in ready.items())
                      + (f"; {n} / 1 = {ready[n] / ready[1]:.2f} x" if n > 1 else ""),
                      highlight=False, soft_wrap=True)
    if args.pss:
        from .bench.pss import compare_memory, memory_table_lines
        from .package import inspect_package

        archive = resolve_target(args.pss, out=args.out).archive
        preload = args.preload or inspect_package(archive).externs
        n = args.max_interpreters
        counts = tuple(args.threads) if args.threads else ((1, n) if n > 1 else (1,))
        with _status(err, "memory") as status:
            rows = compare_memory(archive, counts, preload=preload, backend=args.backend,
                                  on_status=lambda text: status.update(f"memory (PSS): {text}"))
        out.print(f"PSS holding {archive.name}, all processes of each side "
                  f"(preload: {len(preload)} module(s)):", highlight=False)
        for line in memory_table_lines(rows):
            out.print(line, highlight=False)
    return 0


def _bench_serve(args) -> int:
    from rich.console import Console

    from .bench.serve import PEERS, measure_serve, serve_lines, serve_table, window_seconds

    peers = [p.strip() for p in args.peers.split(",") if p.strip() and p.strip() != "none"]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise UsageError(f"unknown peer {', '.join(unknown)}; choose from {', '.join(PEERS)} or none")
    models = args.packages[1:] or ["identity", "smallops"]
    out, err = Console(), Console(stderr=True)
    interpreters = args.max_interpreters
    with _status(err, "bench serve") as status:
        rows, notes = measure_serve(models=models, connections=args.connections,
                                    seconds=args.seconds, rounds=args.rounds,
                                    interpreters=interpreters, peers=peers,
                                    peer_venv=args.peer_venv, out=args.out,
                                    on_status=lambda text: status.update(f"bench serve: {text}"))
    window = window_seconds(args.seconds, args.rounds)
    out.print(serve_table(rows, title=f"multipy bench serve: wrk, median of {args.rounds} "
                          f"interleaved rounds of {window} s per row, {interpreters} "
                          f"interpreters/workers, {os.cpu_count()} cores"))
    for line in [*notes, *serve_lines(rows)]:
        out.print(line, highlight=False, soft_wrap=True)
    return 0


def _bench_ray(args) -> int:
    from rich.console import Console

    try:
        from . import ray  # noqa: F401  (says how to install the extra when Ray is missing)
        from .bench.ray_serve import measure_ray_latency, measure_ray_memory, ray_lines
    except ImportError as exc:
        raise UsageError(f"bench ray: {exc}") from None
    out, err = Console(), Console(stderr=True)
    with _status(err, "bench ray") as status:
        latency = measure_ray_latency(requests=args.ray_requests,
                                      on_status=lambda text: status.update(f"bench ray: {text}"))
        memory = measure_ray_memory(on_status=lambda text: status.update(f"bench ray: {text}"))
    for line in ray_lines(latency, memory):
        out.print(line, highlight=False, soft_wrap=True)
    return 0


def _cmd_soak(args) -> int:
    from rich.console import Console

    from .soak import run_soak

    out, err = Console(), Console(stderr=True)
    with _status(err, "soaking") as status:
        report = run_soak(threads=args.threads, seconds=args.seconds,
                          interpreters=args.interpreters, kill_every=args.kill_every,
                          progress=lambda t, n: status.update(f"soak: {t:.0f} s, {n} calls"))
    out.print(f"{report.calls} calls in {report.seconds:.1f} s ({report.calls_per_second:.0f}/s) "
              f"from {report.threads} threads on {report.interpreters} interpreters: "
              f"{report.good} correct results, {report.expected_errors} expected errors, "
              f"{report.crashed_calls} calls failed by {report.kills} kills "
              f"({report.restarts} restarts); open fds {report.fds_before} -> {report.fds_after}, "
              f"host threads {report.threads_before} -> {report.threads_after}, "
              f"shared memory left held: {len(report.shm_leaked)}", highlight=False, soft_wrap=True)
    for problem in report.problems:
        err.print(f"problem: {problem}", highlight=False)
    return 1 if report.problems else 0


def _bench_device(device: str) -> str:
    """``--device`` in words for titles (``cuda (NVIDIA H100 80GB HBM3)``); exit 2
    with one line when CUDA is asked for and torch sees no GPU."""
    if device != "cuda":
        return device
    import torch

    if not torch.cuda.is_available():
        built = (f"torch {torch.__version__} was built without CUDA"
                 if torch.version.cuda is None else
                 f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
        raise UsageError(f"no CUDA device: {built}; run with --device cpu")
    return f"cuda ({torch.cuda.get_device_name(torch.cuda.current_device())})"


def _threads_ratios(rows) -> list[str]:
    """On CUDA: each multi_python row over the best plain-threads figure of the run
    (what GPU batch-1 serving gains over threads sharing one model)."""
    lines = []
    for bench in dict.fromkeys(r.benchmark for r in rows if r.device != "cpu"):
        mine = [r for r in rows if r.benchmark == bench]
        plain = [r for r in mine if r.strategy == "threads"]
        if not plain:
            continue
        best = max(plain, key=lambda r: r.work_items_per_second)
        if not best.work_items_per_second:
            continue
        for r in mine:
            if r.strategy == "multi_python":
                ratio = r.work_items_per_second / best.work_items_per_second
                lines.append(f"{bench}: multi_python x{r.n_threads} = {ratio:.2f} x the best "
                             f"plain threads ({best.work_items_per_second:,.1f} items/s "
                             f"at {best.n_threads} threads)")
    return lines


def _limit_ratios(rows) -> list[str]:
    """multi_python over limit at equal n, one line each (1.0: the machine's limit)."""
    from .bench.report import speedups

    lines = []
    for r, ratio in speedups(rows, "limit").items():
        if r.strategy == "multi_python":
            lines.append(f"{r.benchmark}: multi_python x{r.n_threads} = {ratio:.2f} of the limit")
    return lines


# ------------------------------------------------------------------------ main
class _Quiet:
    """Stands in for a rich Status where there is no terminal to animate."""

    def update(self, *args, **kwargs) -> None:
        pass


@contextlib.contextmanager
def _status(console, text: str):
    """A rich spinner on ``console`` while the block runs, when it is a terminal."""
    if not console.is_terminal:
        yield _Quiet()
        return
    with console.status(text) as status:
        yield status


def _check_dir_writable(path, option: str = "--out", *, must_exist: bool = False) -> None:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option}: {path} exists and is not a directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{option}: cannot write into {path} (permission denied)")
    if not path.exists() and must_exist:
        raise UsageError(f"{option}: directory {path} does not exist")


def _cmd_serve(args) -> int:
    import dataclasses
    import json

    try:
        from .serve import ModelRegistry, ModelSpec, ServeOptions
        from .serve.server import serve
    except ImportError as exc:
        raise UsageError(f"{exc}: `multipy serve` needs the serve extra: "
                         "pip install 'multipy[serve]'") from None
    models: dict[str, str] = {}
    settings: dict = {}
    if args.config:
        try:
            with open(args.config) as f:
                config = json.load(f)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--config {args.config}: {exc}") from None
        if not isinstance(config, dict) or not isinstance(config.get("models", {}), dict):
            raise UsageError(f'--config {args.config}: expected {{"models": {{"NAME": "PATH"}}, ...}}')
        models.update(config.pop("models", {}))
        settings.update(config)
    for item in args.models:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"expected NAME=PATH, got {item!r}")
        models[name] = path
    if not models:
        raise UsageError("name at least one model: multipy serve NAME=PATH (e.g. simple=simple.pt)")
    for flag, *_ in _SERVE_OPTIONS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            settings[flag[2:].replace("-", "_")] = value
    fields = {f.name for f in dataclasses.fields(ServeOptions)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise UsageError(f"unknown option {', '.join(unknown)}; options are {', '.join(sorted(fields))}")
    specs = {}
    for name, path in models.items():
        try:
            spec = ModelSpec.parse(name, path)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if not os.path.isfile(spec.path):
            raise UsageError(f"model {name!r}: no file {spec.path}")
        specs[name] = spec
    try:
        options = ServeOptions(**settings)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if args.ray:
        return _serve_on_ray(args, specs, settings)
    if args.replicas is not None or args.address is not None:
        raise UsageError("--replicas and --address go with --ray")
    registry = ModelRegistry.open(specs, options, interpreters=args.interpreters,
                                  backend=args.backend)

    def listening(port: int) -> None:
        print(f"multipy serve: http://{args.host}:{port} serving {', '.join(specs)} on "
              f"{args.interpreters} {registry.manager.backend} interpreters", file=sys.stderr,
              flush=True)

    serve(registry, host=args.host, port=args.port, log_level=args.log_level,
          on_listening=listening)
    return 0


def _serve_on_ray(args, specs: dict, settings: dict) -> int:
    try:
        import multipy.ray
    except ImportError as exc:
        raise UsageError(f"--ray: {exc}") from None
    replicas = args.replicas or 1
    port = args.port
    if port == 0:
        from .bench.ray_serve import free_port

        port = free_port()

    def ready(url: str) -> None:
        print(f"multipy serve: {url} serving {', '.join(specs)} on Ray: {replicas} replica(s) x "
              f"{args.interpreters} {args.backend} interpreters", file=sys.stderr, flush=True)

    try:
        multipy.ray.run(specs, address=args.address, replicas=replicas,
                        interpreters=args.interpreters, host=args.host, port=port,
                        backend=args.backend, on_ready=ready, **settings)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return 0


_COMMANDS = {"demo": _cmd_demo, "serve": _cmd_serve, "examples": _cmd_examples, "inspect": _cmd_inspect,
             "package": _cmd_package,
             "info": _cmd_info, "bench": _cmd_bench, "soak": _cmd_soak}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``multipy`` command line; return the exit status.

    Example:
        >>> main(["inspect", "/tmp/ex/simple.pt"])              # doctest: +SKIP
        torch.package archive /tmp/ex/simple.pt (root 'simple', python 3.11.7)
        ...
        0
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or argparse's own usage error (2)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    from .bench.errors import BenchError, TargetError
    from .errors import MultipyError

    try:
        return _COMMANDS[args.command](args)
    except (UsageError, TargetError) as exc:
        return _error(str(exc), 2)
    except (_Failure, BenchError, MultipyError, OSError) as exc:
        return _error(str(exc) or type(exc).__name__, 1)
    except ImportError as exc:
        return _error(f"{exc}: `multipy {args.command}` needs it; install the extras with "
                      "pip install 'multipy[cli]' (and torch for demo and bench)", 1)
    except KeyboardInterrupt:
        return _error("interrupted", 130)


def _error(message: str, code: int) -> int:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"multipy: error: {first}", file=sys.stderr)
    return code
