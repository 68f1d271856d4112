"""pgreembed: background (re-)embedding worker for PostgreSQL + pgvector."""

__version__ = "0.1.0"
