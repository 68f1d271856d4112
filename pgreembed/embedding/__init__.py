"""Texts to vectors: providers, token counts, rate limits, budgets, the write throttle and
vectors kept while the database is down. It never loads a batch of its own: worker/batch.py
does, and calls in here."""
