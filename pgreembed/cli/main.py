"""`pgreembed` command line: init, tick, scheduler, status, failures, search, doctor, tune,
migrate, demo, providers, import-pgai."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence

import psycopg

from pgreembed.cli import status
from pgreembed.cli.formatting import HELP_EXIT_CODES, Parser, add_command, positive_int
from pgreembed.cli.output import emit_error
from pgreembed.config import Settings, load_settings
from pgreembed.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, ConfigError, PgreembedError
from pgreembed.observability.logs import setup_logging
from pgreembed.observability.redact import redact
from pgreembed.store.pool import connect
from pgreembed.store.table_lock import DEFAULT_LOCK_TIMEOUT_MS, DEFAULT_WAIT_SECONDS, LockPolicy


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def cmd_init(args: argparse.Namespace) -> int:
    settings = _settings(args)
    names = [args.target] if args.target else list(settings.targets)
    for done, name in enumerate(names):
        try:
            _init_one(settings, name, args.lock_wait)
        except Exception:
            if done:  # the error's "nothing changed" is this target's step
                rest = names[done + 1:]
                print(f"pgreembed: init: {', '.join(names[:done])} initialised before {name}"
                      f" failed{'; not tried: ' + ', '.join(rest) if rest else ''} (`init`"
                      " again once fixed: it redoes nothing done)", file=sys.stderr)
            raise
    return EXIT_OK


def _init_one(settings: Settings, name: str, lock_wait: float) -> None:
    from pgreembed.migrations.side_fill import route_model_change
    from pgreembed.store.setup import init_target

    routed = route_model_change(settings, settings.target(name))
    if routed is not None:
        slot, plan = routed
        cost = "unknown" if plan.cost_usd is None else f"${plan.cost_usd:.4f}"
        print(f"init: target {name}: the model changed to {slot.model_key}: {plan.rows}"
              f" rows are re-embedded into the side column {slot.vector_column}"
              f" (~{plan.tokens} tokens, {cost}); search keeps the current model until"
              " the scheduler swaps it in (`pgreembed status` shows the path)")
    slot = init_target(settings.database_url, settings.target(name),
                       LockPolicy(wait_seconds=lock_wait))
    print(f"init: target {name}: column {slot.vector_column} ({slot.model_key}) ready,"
          f" slot {slot.id}")


def cmd_tick(args: argparse.Namespace) -> int:
    from pgreembed.cli.progress import Progress
    from scheduler.tick import TickProgress, run_tick

    settings = _settings(args)
    if not args.wait:
        return run_tick(settings)
    started = time.monotonic()
    with Progress("tick", "rows") as bar:
        def show(at: TickProgress) -> None:
            bar.update(at.done, at.enqueued, f"pass {at.passes}")

        code = run_tick(settings, wait=True, timeout=args.timeout, on_progress=show)
    if code == 0:
        print(f"tick: done, {bar.done} rows processed in"
              f" {time.monotonic() - started:.1f} s", flush=True)
    return code


def cmd_scheduler(args: argparse.Namespace) -> int:
    from scheduler.service import SchedulerService

    SchedulerService(_settings(args)).run()
    return EXIT_OK


def cmd_failures(args: argparse.Namespace) -> int:
    from pgreembed.cli.failures import cmd_failures as run

    return run(args)


def cmd_search(args: argparse.Namespace) -> int:
    from pgreembed.operations.search import search

    settings = _settings(args)
    with connect(settings.database_url) as conn:
        for hit in search(conn, settings, args.target, args.query, args.limit):
            print(f"{hit.distance:.3f}  {hit.key}  {hit.text[:100]!r}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from pgreembed.cli.progress import Progress
    from pgreembed.demo.run import run_demo

    with Progress("demo: embedding", "rows") as bar:
        return run_demo(rows=args.rows, workers=args.workers,
                        on_progress=lambda done, total: bar.update(done, total))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pgreembed")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print only the versioned JSON document (no progress)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pgreembed", description=__doc__,
                    epilog=HELP_EXIT_CODES,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--config", help="TOML file (default: $PGREEMBED_CONFIG or"
                                         " ./pgreembed.toml)")
    from pgreembed.cli.completion import add_completion

    add_completion(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_text: str,
            example: str) -> argparse.ArgumentParser:
        command = add_command(sub, name, help_text, help_text, example=example)
        command.set_defaults(handler=handler)
        return command

    p = add("init", cmd_init, "create or update the bookkeeping for the targets (idempotent)",
            "pgreembed init --target docs")
    p.add_argument("--target", help="only this target")
    p.add_argument("--lock-wait", type=float, default=DEFAULT_WAIT_SECONDS, metavar="S",
                   help="give up after retrying the app table's lock this long (each attempt"
                        f" waits at most {DEFAULT_LOCK_TIMEOUT_MS} ms; then exit 4)")
    p = add("tick", cmd_tick, "one scheduling pass for a cronjob, then exit",
            "pgreembed tick --wait --timeout 3000")
    p.add_argument("--wait", action="store_true",
                   help="wait until every pending row is done (a progress bar on a terminal)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="seconds --wait may take (then exit 3)")
    add("scheduler", cmd_scheduler, "run the continuous scheduler (one leader among replicas)",
        "pgreembed scheduler")
    p = add("status", status.cmd_status, "counts per target and column (cheap; --exact scans)",
            "pgreembed status --watch 5")
    _add_json(p)
    p.add_argument("--watch", type=status.watch_seconds, metavar="SECONDS",
                   help="refresh every SECONDS (at least 0.1) until Ctrl-C")
    p.add_argument("--exact", action="store_true",
                   help="count every row exactly (scans the table: seconds per million rows)")
    p = add("failures", cmd_failures, "rows that could not be embedded, and why, in every"
            " column being filled (live, a migration's new one, the old one kept after a swap)",
            "pgreembed failures --target docs --limit 50")
    p.add_argument("--target", required=True)
    p.add_argument("--column", help="only this vector column")
    p.add_argument("--limit", type=positive_int, default=20,
                   help="most recent failures shown per column")
    p.add_argument("--retry", action="store_true", help="make the failed rows pending again")
    _add_json(p)
    p = add("search", cmd_search, "semantic search with the target's active model",
            'pgreembed search --target docs "green tea brewing"')
    p.add_argument("--target", required=True)
    p.add_argument("--limit", "-k", type=positive_int, default=5)
    p.add_argument("query")
    p = add("demo", cmd_demo, "embedded Postgres + Redis + offline model, end to end",
            "pgreembed demo --rows 300")
    p.add_argument("--rows", type=positive_int, default=1000, help="corpus size")
    p.add_argument("--workers", type=positive_int, default=2, help="worker processes")
    from pgreembed.cli import doctor, import_pgai, providers, tune
    from pgreembed.cli import migrate as cli_migrate

    cli_migrate.register(sub)
    doctor.register(sub)
    tune.register(sub)
    providers.register(sub)
    import_pgai.register(sub)
    return parser


def _failed(args: argparse.Namespace, code: int, message: str) -> int:
    """The one line on stderr, and with --json the error document on stdout."""
    print(f"pgreembed: {message}", file=sys.stderr)
    emit_error(args, code, message)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        return _failed(args, exc.exit_code, f"configuration error: {redact(str(exc))}")
    except PgreembedError as exc:  # expected: a message for the operator, and its exit code
        return _failed(args, exc.exit_code, redact(str(exc)))
    except psycopg.Error as exc:
        return _failed(args, EXIT_ERROR, f"Postgres: {type(exc).__name__}: {redact(str(exc))}")
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python from reporting
        # the pipe again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    except Exception as exc:
        message = _redis_error(exc)
        if message is None:
            raise
        return _failed(args, EXIT_ERROR, message)


def _redis_error(exc: Exception) -> str | None:
    """The line for a Redis error, None for any other exception. `redis` is looked up, not
    imported: only a command that imported it can raise its errors, and the commands that
    need no Redis then start without it (~0.06 s of CPU a call)."""
    redis = sys.modules.get("redis")
    if redis is None or not isinstance(exc, redis.RedisError):
        return None
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):  # as pool.connect says it
        return f"cannot connect to Redis: {redact(str(exc))} (REDIS_URL)"
    return f"Redis: {type(exc).__name__}: {redact(str(exc))}"


if __name__ == "__main__":
    sys.exit(main())
