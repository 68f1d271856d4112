"""What `tune` and `migrate compare` print on the demo's real offline model and corpus.

    python -m bench.quality_demo [--rows 2000] [--lists 40]

The stdlib docstrings of `pgreembed demo`, embedded by the offline all-MiniLM-L6-v2
model (real semantics), with an IVFFlat index on the live column. `tune` sweeps
ivfflat.probes against exact search; then a migration to a stand-in "model" that
answers hash vectors (the local OpenAI-compatible server: no semantics at all) is
filled and indexed, and `migrate compare` shows what the quality gate says about it
before a swap. Prints each command and its output as an operator would see them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

from pgreembed.demo.run import CONFIG, _load_corpus
from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.services import EmbeddedPostgres, LocalRedis

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-quality-demo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--lists", type=int, default=40)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="pgreembed-quality-"))
    postgres, redis_server = EmbeddedPostgres(scratch / "pgdata"), LocalRedis()
    fake = FakeOpenAIServer(api_key=KEY).start()
    worker = None
    try:
        dsn = postgres.start()
        config = scratch / "pgreembed.toml"
        config.write_text(CONFIG)
        env = {**os.environ, "DATABASE_URL": dsn, "REDIS_URL": redis_server.start(),
               "PGREEMBED_CONFIG": str(config), "PGREEMBED_LOCAL_THREADS": "1",
               "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": fake.base_url,
               "PYTHONPATH": str(ROOT)}

        def cli(*words: str, show: bool = True) -> None:
            result = subprocess.run([sys.executable, "-m", "pgreembed", *words], env=env,
                                    capture_output=True, text=True, cwd=ROOT, timeout=900)
            if show:
                print(f"$ pgreembed {' '.join(words)}\n{result.stdout}{result.stderr}",
                      flush=True)
            if result.returncode not in (0, 1):
                raise RuntimeError(result.stderr[-2000:])

        total = _load_corpus(dsn, args.rows)
        cli("init", show=False)
        worker = subprocess.Popen([sys.executable, "-m", "dramatiq", "--processes", "2",
                                   "--threads", "1", "worker"], env=env, cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cli("tick", "--wait", "--timeout", "900", show=False)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE INDEX docs_embedding_idx ON docs USING ivfflat"
                         f" (embedding vector_cosine_ops) WITH (lists = {args.lists})")
            conn.execute("ANALYZE docs")
        print(f"{total} stdlib docstrings embedded by the offline model; IVFFlat index with"
              f" {args.lists} lists on the live column\n", flush=True)
        cli("tune", "--target", "docs", "--recall", "0.95")
        cli("migrate", "start", "--target", "docs", "--provider", "openai", "--model",
            "fake-384", "--dimensions", "384", show=False)
        cli("tick", "--wait", "--timeout", "900", show=False)
        cli("migrate", "index", "--target", "docs", show=False)
        print("a migration to `fake-384` (hash vectors from the local test server, no"
              " semantics) is filled and indexed:\n", flush=True)
        cli("migrate", "compare", "--target", "docs", "--sample", "100")
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(30)
        fake.stop()
        redis_server.stop()
        postgres.stop()


if __name__ == "__main__":
    main()
