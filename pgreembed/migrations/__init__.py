"""A change of embedding model while the app keeps searching and writing: plan, start,
fill (side by side, derived, or through the Batch API), index, compare, swap, rollback,
finalize (docs/migrations.md)."""
