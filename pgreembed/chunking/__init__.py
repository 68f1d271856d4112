"""Chunked targets: one row of the app's table, many chunks in a table of their own.

config.py reads `[target.chunking]` and `[target.destination]`; splitter.py splits and
formats exactly as pgai 0.12.1 does; matching.py turns old and new chunk lists into the
smallest change; stage.py is the worker step that re-chunks dirty parents. The chunk
table itself is an ordinary target table for the rest of pgreembed (key embedding_uuid,
text `chunk`), so embedding, migrations and status need nothing of their own.
"""
