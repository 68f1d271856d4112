"""`migrate plan`: rows, tokens, cost and time of a migration, before it spends anything."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from pgreembed.config import VECTOR_MAX_INDEXED, Budget, Settings, Target
from pgreembed.config.model_keys import model_key
from pgreembed.embedding.budgets import configured_budget
from pgreembed.embedding.pricing import list_price
from pgreembed.errors import MigrationError
from pgreembed.migrations import app_objects, disk
from pgreembed.migrations.index import column_indexes, index_defaults
from pgreembed.migrations.state import SWAP_COLUMN, new_column_name
from pgreembed.store import app_objects as app_catalog
from pgreembed.store import catalog, server_versions
from pgreembed.store.budgets import recorded_budget
from pgreembed.store.pool import connect
from pgreembed.store.slots import Slot, app_table, load_slots, new_column_type
from pgreembed.store.texts import no_text
from pgreembed.store.trusted_sql import NO_PARAMS

# Above this many rows (the planner's estimate) `plan` counts a sample of the table's
# pages instead of every row: a full count took 1.1 s at 5M rows, and grows with the table.
EXACT_COUNT_ROWS = 1_000_000
SAMPLE_ROWS = 100_000


@dataclass(frozen=True)
class Plan:
    rows: int
    rows_without_text: int
    rows_estimated: bool  # rows / rows_without_text extrapolated from a sample of pages
    distinct_texts: int  # what the provider is sent with `dedupe` on (else every text)
    tokens: int
    tokens_exact: bool  # every row's text counted (else extrapolated from a sample)
    tokens_counted_by_tokenizer: bool  # False: UTF-8 bytes, an upper bound
    cost_usd: float | None
    minutes_at_rate_limit: float | None
    budget: Budget  # of the new model: what bounds the fill's speed
    storage_bytes: int
    column: str
    column_type: str
    statements: list[str]
    blockers: list[str]
    notes: list[str]
    # The app's objects reading the live column, with what the swap will do with each.
    app_objects: list[app_objects.Decision] = field(default_factory=list)
    space: disk.DiskEstimate | None = None  # the table's bytes now, at the peak, after


def _column_type_notes(target: Target, dimensions: int, kind: str) -> list[str]:
    """Why the new column gets a type the config does not name."""
    if target.vector_type == kind:
        return []
    if kind == "halfvec" and dimensions > VECTOR_MAX_INDEXED:
        return [f"{dimensions} > {VECTOR_MAX_INDEXED} dimensions: the column is"
                f" halfvec({dimensions}), since pgvector indexes `vector` only up to"
                f" {VECTOR_MAX_INDEXED} dims"]
    if kind == "halfvec":
        return [f"the column is halfvec({dimensions}), as the live column is (2 bytes a"
                " component); `vector_type = \"vector\"` in the target makes it vector"]
    return []


def plan(settings: Settings, target: Target, provider: str, model: str, dimensions: int,
         sample_limit: int = 100_000, budget: Budget | None = None,
         vector_type: str | None = None, disk_budget: int | None = None) -> Plan:
    """What `start` would do and cost; changes nothing. `budget` is what `start` would be
    given; the time estimate uses every budget of the new model (see pgreembed.embedding.budgets).
    `vector_type`: the new column's storage (default: `store.slots.new_column_type`).
    `disk_budget`: the bytes the table may grow by at the migration's peak; a peak above it
    is a blocker."""
    from pgreembed.embedding.providers import make_provider
    from pgreembed.migrations.plan_sql import migration_statements
    from pgreembed.store.slots import text_expression

    blockers: list[str] = []
    notes: list[str] = []
    if dimensions > 16000:
        blockers.append(f"{dimensions} dimensions: pgvector columns hold at most 16000")
    table = app_table(target)
    text = text_expression(target)
    with connect(settings.database_url) as conn:
        total, empty, distinct, estimated = _count_rows(conn, table, text)
        sample = [r[0] for r in conn.execute(sql.SQL(
            "SELECT ({})::text FROM {} WHERE NOT {} LIMIT %s").format(
                text, table, no_text(text)), (sample_limit,))]
        open_migration = conn.execute(
            "SELECT id, phase FROM pgreembed.migrations WHERE target = %s"
            " AND phase IN ('filling', 'swapped', 'rolled_back')", (target.name,)).fetchone()
        model_id_row = conn.execute("SELECT id FROM pgreembed.models WHERE key = %s",
                                    (model_key(provider, model, dimensions),)).fetchone()
        live = next((s for s in load_slots(conn, target) if s.role == "live"), None)
        if live is None:
            raise MigrationError(f"target {target.name!r} is not initialised: pgreembed init")
        kind = vector_type or new_column_type(target, live, dimensions)
        if vector_type is None:
            notes += _column_type_notes(target, dimensions, kind)
        index_method, index_distance = index_defaults(conn, live)
        versions = server_versions.read(conn)
        budget = (budget or Budget()).tighter(configured_budget(settings, provider, model))
        if provider != "local":
            budget = budget.tighter(recorded_budget(conn, provider, model))
        column = (new_column_name(target, model_id_row[0]) if model_id_row
                  else f"{target.vector_column}__m<id>")
        statements = migration_statements(
            conn, live, column, f"{kind}({dimensions})", index_method,
            f"{kind}_{index_distance}_ops", [i.name for i in column_indexes(conn, live)],
            SWAP_COLUMN)
        ann_bytes = _index_bytes(conn, live)
        notes += fillfactor_advice(conn, live)
        space = disk.estimate(conn, live, total, dimensions, kind, ann_bytes)
        objects = app_objects.swap_decisions(conn, table, [live.vector_column],
                                             live.column_type, f"{kind}({dimensions})")
        notes += app_objects.publication_notes(
            conn, app_catalog.publications(conn, target.schema, target.table), table, column,
            f"{kind}({dimensions})")
    blockers.extend(problem for problem in (
        versions.missing(server_versions.HALFVEC) if kind == "halfvec" else None,
        versions.missing(server_versions.L1_INDEX) if index_distance == "l1" else None,
    ) if problem is not None)
    if disk_budget is not None and space.peak_extra > disk_budget:
        blockers.append(f"the migration needs ~{space.peak_extra:,} more bytes of disk at its"
                        f" peak (the table {space.now:,} -> ~{space.peak:,}), over"
                        f" --disk-budget {disk_budget:,}")
    refused = [f"{d.obj.kind} {d.obj.name}" for d in objects if d.action == app_objects.REFUSE]
    if refused:
        notes.append(f"the swap will refuse while {', '.join(refused)} read(s) the vector"
                     " column (each app object's way out is above); start and fill meanwhile")
    if provider == "local" and dimensions != 384:
        blockers.append("the local model produces 384 dimensions (--dimensions 384)")
    if open_migration is not None:
        number, phase = open_migration
        then = ("finish it (`migrate finalize`) or roll it back and finalize" if phase != "filling"
                else "swap and finalize it, or `migrate cancel` it")
        blockers.append(f"migration {number} of {target.name!r} is open ({phase}): {then} first")
    if empty:
        notes.append(f"{'~' if estimated else ''}{empty} rows have no text: they get no vector"
                     " in either column (recorded as failures) and do not hold the swap")
    embedder = make_provider(settings, provider, model, dimensions, target)
    with_text = total - empty
    exact = not estimated and len(sample) == with_text
    # With dedupe each distinct text is paid for once (pgreembed.embedding.reuse).
    sent = sorted(set(sample)) if target.dedupe else sample
    paid_texts = distinct if target.dedupe else with_text
    counted = sum(embedder.count_tokens(sent)) if sent else 0
    tokens = counted if exact else math.ceil(counted / max(1, len(sent)) * paid_texts)
    if target.dedupe and distinct < with_text:
        notes.append(f"{with_text - distinct} rows repeat another row's text: each distinct"
                     f" text is embedded once ({distinct} of {with_text}); the estimate"
                     " counts those (dedupe = false counts every row)")
    price = list_price(provider, model, target)
    cost = None if price is None else tokens / 1e6 * price
    element = 2 if kind == "halfvec" else 4
    storage = total * (element * dimensions + 8)
    # The new model's shared budgets bound the fill; without them only the workers do.
    limits = []
    if budget.tokens_per_minute:
        limits.append(tokens / budget.tokens_per_minute)
    if budget.requests_per_minute:
        limits.append(math.ceil(with_text / target.batch_size) / budget.requests_per_minute)
    minutes = max(limits) if limits and provider != "local" else None
    return Plan(total, empty, estimated, paid_texts, tokens, exact, embedder.counts_exactly,
                cost, minutes, budget, storage, column, f"{kind}({dimensions})", statements,
                blockers, notes, objects, space)


ADVISED_FILLFACTOR = 70


def fillfactor_advice(conn: psycopg.Connection, live: Slot) -> list[str]:
    """A note when the live column has an ANN index and the table's pages are filled full:
    the new column's fill is HOT (no insert of the row's unchanged live vector into the
    live index, a graph search per row) only where the row's page has room. pgreembed does
    not change the app's storage parameters itself: the note says how, and how to undo it."""
    if not any(i.valid and i.distance for i in column_indexes(conn, live)):
        return []
    current = catalog.fillfactor(conn, catalog.regclass(conn, live.table))
    if current <= ADVISED_FILLFACTOR:
        return []
    alter = sql.SQL("ALTER TABLE {} SET (fillfactor = {});").format(
        live.table, sql.Literal(ADVISED_FILLFACTOR)).as_string(conn)
    reset = sql.SQL("ALTER TABLE {} RESET (fillfactor);").format(live.table).as_string(conn)
    return [f"the table's fillfactor is {current}: a fill update is HOT (the live ANN index"
            " is not touched) only where the row's page has room, which full pages do not"
            f" have. `{alter}` (a SHARE UPDATE EXCLUSIVE lock, which blocks none of the app's"
            " reads or writes) leaves room on every page written from then on: each"
            " migration's fill moves the rows it cannot update in place, so the next ones"
            f" are mostly HOT (docs/migrations.md); `{reset}` undoes it"]


def _index_bytes(conn: psycopg.Connection, live: Slot) -> int:
    """Bytes of the live column's indexes (dropped at finalize, rebuilt on the new one)."""
    names = [i.name for i in column_indexes(conn, live)]
    row = conn.execute("SELECT coalesce(sum(pg_relation_size(format('%%I.%%I', %s::text, n)"
                       "::regclass)), 0) FROM unnest(%s::text[]) n",
                       (live.target.schema, names)).fetchone()
    return int(row[0]) if row else 0


def _count_rows(conn: psycopg.Connection, table: sql.Composable, text: sql.Composable
                ) -> tuple[int, int, int, bool]:
    """(rows, rows without text, distinct texts, estimated): exact up to EXACT_COUNT_ROWS
    rows, else from a TABLESAMPLE of about SAMPLE_ROWS rows scaled to the planner's row
    estimate (a sample's distinct share understates texts repeated across pages)."""
    guess = max(0, int(catalog.row_estimate(conn, table.as_string(conn))))
    counts = sql.SQL("SELECT count(*), count(*) FILTER (WHERE {no}),"
                     " count(DISTINCT md5(({text})::text)) FILTER (WHERE NOT {no}) FROM {table}"
                     ).format(no=no_text(text), text=text, table=table)
    if guess <= EXACT_COUNT_ROWS:
        found = conn.execute(counts, NO_PARAMS).fetchone() or (0, 0, 0)
        return int(found[0]), int(found[1]), int(found[2]), False
    percent = min(100.0, 100.0 * SAMPLE_ROWS / guess)
    sampled = conn.execute(sql.SQL("{} TABLESAMPLE SYSTEM (%s)").format(counts),
                           (percent,)).fetchone() or (0, 0, 0)
    seen = max(1, int(sampled[0]))
    return (guess, round(guess * int(sampled[1]) / seen),
            round(guess * int(sampled[2]) / seen), True)
