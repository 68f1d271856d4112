"""Tables whose schema or name contains a dot can be configured and embedded end to end."""

from __future__ import annotations

import numpy as np

from pgreembed.testing.fake_vectors import fake_vector
from tests.helpers import Stack

MODEL = "fake-384"


def _target(name: str, table_fields: str) -> str:
    return f"""
[[target]]
name = "{name}"
{table_fields}
text_column = "body"
vector_column = "embedding"
provider = "openai"
model = "{MODEL}"
dimensions = 384
"""


def test_dotted_schema_and_table_names_end_to_end(stack: Stack) -> None:
    with stack.connect() as conn:
        conn.execute('CREATE SCHEMA "my.schema"')
        for table in ("my.table", "other.table"):
            conn.execute(f'CREATE TABLE "my.schema"."{table}" (id int PRIMARY KEY, body text)')
            conn.execute(f'INSERT INTO "my.schema"."{table}" VALUES (1, %s)', (f"in {table}",))
    stack.config_path.write_text(
        _target("separate", 'schema = "my.schema"\ntable = "my.table"')
        + _target("quoted", "table = '\"my.schema\".\"other.table\"'")
        + "\n[worker]\npoll_interval = 0.5\n")
    result = stack.cli("init")
    assert result.returncode == 0, result.stderr
    stack.start_worker(processes=1, threads=2)
    result = stack.cli("tick", "--wait", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    with stack.connect() as conn:
        for table in ("my.table", "other.table"):
            vector = conn.execute(f'SELECT embedding FROM "my.schema"."{table}"').fetchone()[0]
            assert vector is not None, f"{table}: row 1 was not embedded"
            np.testing.assert_allclose(vector.to_numpy(),
                                       fake_vector(MODEL, f"in {table}", 384), atol=1e-6)
