"""Backfill into the table users have: a vector column that carries an index.

- `measure_indexed`: the fastest raw write into the indexed column (512-row
  transactions on 1..cores connections) against our full pipeline writing into the same
  indexed column (the direct path: the automatic side fill kept out of the way), same
  rows, back to back; and the same pair on the unindexed column.
- `measure_side_path`: a MODEL CHANGE of a filled, HNSW-indexed column, directly (`init`
  after the model edit with the automatic side fill kept out of the way: in place,
  through the index) against the side column of the migration commands (`migrate start`
  fills an unindexed column, `migrate index` builds CONCURRENTLY, `migrate swap`), end to
  end; and the backlog size where the two cost the same. Every row has a live vector
  here, so each side-column write re-inserts it into the live HNSW index (no HOT update:
  the counts are printed). The backlog case (no vector yet) is bench.side_backlog.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

from bench.harness import (
    Services,
    Tuning,
    index_sql,
    pipeline,
    vector_type,
    verify_vectors,
)
from bench.sections import CeilingRun, OursRun, run_ceiling, run_ours
from bench.side_backlog import NO_SIDE_FILL, table_updates

OTHER_MODEL_PREFIX = "fake-b"  # a second model of the same size (its own deterministic vectors)


@dataclass
class IndexedCase:
    index: str | None  # None: the unindexed column (not what users have)
    writes: list[CeilingRun]  # fastest first
    ours: OursRun

    @property
    def ceiling(self) -> CeilingRun:
        return self.writes[0]

    @property
    def label(self) -> str:
        return f"{self.index}-indexed" if self.index else "UNINDEXED (not what users have)"

    def ratio(self) -> float:
        return self.ours.progress.warm() / self.ceiling.rate

    def postgres_per_1000(self) -> tuple[float, float]:
        """Postgres CPU seconds per 1000 rows: (ceiling, ours)."""
        rows = self.ours.rows
        return (1000 * self.ceiling.cpu_used["postgres"] / rows,
                1000 * self.ours.cpu_used["postgres"] / rows)

    def worker_us_per_row(self) -> float:
        return 1e6 * self.ours.cpu_used.get("workers", 0.0) / self.ours.rows

    def line(self) -> str:
        ceiling_pg, ours_pg = self.postgres_per_1000()
        return (f"{self.label}: ceiling {self.ceiling.rate:,.0f} rows/s"
                f" ({self.ceiling.strategy}), ours {self.ours.progress.warm():,.0f} rows/s"
                f" (warm); ours/ceiling {self.ratio():.2f}; Postgres CPU s per 1000 rows:"
                f" ceiling {ceiling_pg:.2f}, ours {ours_pg:.2f} ({ours_pg / ceiling_pg:.2f}x);"
                f" worker CPU {self.worker_us_per_row():.0f} us/row")


def connection_strategies(batch_size: int) -> dict[str, tuple[int | None, int]]:
    """Raw writes into an indexed column: batch-row transactions on 1..cores connections."""
    cores = os.cpu_count() or 1
    return {f"{batch_size}-row transactions on {n} connection{'s' if n > 1 else ''}":
            (batch_size, n) for n in range(1, cores + 1)}


def measure_indexed(services: Services, rows: int, tuning: Tuning, index: str | None
                    ) -> IndexedCase:
    """Raw writes (every strategy) then ours, on fresh copies of the same rows."""
    writes = run_ceiling(services, rows, tuning, index,
                         connection_strategies(tuning.batch_size))
    for write in writes:
        print(f"    raw write, {write.strategy}: {rows} rows in {write.seconds:.1f} s:"
              f" {write.rate:,.0f} rows/s; {write.cpu}", flush=True)
    # The same write as the raw one: the automatic side path kept out of the way (with
    # it, a backlog this size is filled in a side column and "ours" would time the fill
    # without the index build; bench.side_backlog compares the two paths end to end).
    ours = run_ours(services, rows, tuning, index=index, extra_config=NO_SIDE_FILL)
    print(f"    ours: {rows} rows in {ours.progress.done_at - ours.progress.started:.1f} s"
          f" from tick launch: {ours.progress.warm():,.0f} rows/s; {ours.cpu}", flush=True)
    return IndexedCase(index, writes, ours)


# -- side column vs direct writes ----------------------------------------------------

@dataclass
class SidePathRun:
    rows: int
    direct_seconds: float  # `init` after the model edit + workers re-embed in place
    fill_seconds: float  # `migrate start` + workers fill the unindexed side column
    build_seconds: float  # `migrate index` (CREATE INDEX CONCURRENTLY)
    swap_seconds: float  # `migrate swap`
    direct_updates: tuple[int, int] = (0, 0)  # (updates, HOT updates) of docs
    side_updates: tuple[int, int] = (0, 0)

    @property
    def side_seconds(self) -> float:
        return self.fill_seconds + self.build_seconds + self.swap_seconds

    def crossover_rows(self) -> float | None:
        """Backlog (rows) above which the side column wins on this table: direct costs
        d per row, the side path f per row plus the build and swap of the whole table."""
        per_row_direct = self.direct_seconds / self.rows
        per_row_fill = self.fill_seconds / self.rows
        if per_row_direct <= per_row_fill:
            return None
        return (self.build_seconds + self.swap_seconds) / (per_row_direct - per_row_fill)


def filled_template(services: Services, rows: int, index: str = "hnsw") -> str:
    """A database whose `embedding` column holds every row's vector of the services'
    model (filled by our pipeline, then indexed): the table of an app in production."""
    key = f"{rows}_filled_{index}"
    if key in services._templates:  # noqa: SLF001 - the harness's template cache
        return services._templates[key]  # noqa: SLF001
    dsn = services.fresh_copy(rows, "fill")
    with pipeline(services, dsn, Tuning()) as run:
        run.start_worker()
        run.cli("tick", "--wait", "--timeout", "1800")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(index_sql(index, vector_type(services.dims), "embedding"))
        conn.execute("VACUUM ANALYZE docs")
    name = str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
    services._templates[key] = name  # noqa: SLF001
    return name


def copy_of(services: Services, template: str, label: str) -> str:
    name = f"bench_{label}_{os.urandom(4).hex()}"
    with psycopg.connect(services.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template)))
    return services.dsn(name)


def other_model(services: Services) -> str:
    return f"{OTHER_MODEL_PREFIX}-{services.dims}"


def measure_side_path(services: Services, rows: int, tuning: Tuning) -> SidePathRun:
    template = filled_template(services, rows)
    new_model = other_model(services)

    dsn = copy_of(services, template, "direct")
    try:
        # Without NO_SIDE_FILL, `init` itself routes a model change of a table over
        # side_fill.min_rows into a side fill: "direct" would be the side path too.
        with pipeline(services, dsn, tuning, init=False, model=new_model,
                      extra_config=NO_SIDE_FILL) as run:
            run.start_worker()
            before = table_updates(dsn)
            started = time.monotonic()
            run.cli("init")  # the model edit: every row is outdated, re-embedded in place
            run.cli("tick", "--wait", "--timeout", "3600")
            direct = time.monotonic() - started
            direct_updates = _minus(table_updates(dsn), before)
        _require_no_migration(dsn)
        verify_vectors(dsn, new_model, services.dims, rows)
    finally:
        services.drop(dsn)
    print(f"    direct (init after the model edit, in place through the HNSW index):"
          f" {direct:.1f} s = {rows / direct:,.0f} rows/s; docs updates {direct_updates[0]:,}"
          f" ({direct_updates[1]:,} HOT)", flush=True)

    dsn = copy_of(services, template, "side")
    try:
        with pipeline(services, dsn, tuning, init=False) as run:
            run.start_worker()
            started = time.monotonic()
            run.cli("migrate", "start", "--target", "docs", "--model", new_model,
                    "--dimensions", str(services.dims))
            before = table_updates(dsn)
            run.cli("tick", "--wait", "--timeout", "3600")
            side_updates = _minus(table_updates(dsn), before)
            filled = time.monotonic()
            run.cli("migrate", "index", "--target", "docs")
            built = time.monotonic()
            run.cli("migrate", "swap", "--target", "docs")
            swapped = time.monotonic()
        verify_vectors(dsn, new_model, services.dims, rows)
    finally:
        services.drop(dsn)
    result = SidePathRun(rows, direct, filled - started, built - filled, swapped - built,
                         direct_updates, side_updates)
    print(f"    side column (migrate start + fill, index CONCURRENTLY, swap):"
          f" {result.side_seconds:.1f} s = fill {result.fill_seconds:.1f} + build"
          f" {result.build_seconds:.1f} + swap {result.swap_seconds:.1f}; docs updates while"
          f" filling {side_updates[0]:,} ({side_updates[1]:,} HOT)", flush=True)
    return result


def _minus(after: tuple[int, int], before: tuple[int, int]) -> tuple[int, int]:
    return after[0] - before[0], after[1] - before[1]


def _require_no_migration(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        found = conn.execute("SELECT id, auto_reason FROM pgreembed.migrations").fetchall()
    if found:
        raise AssertionError(f"the direct run went side by side: {found}")
