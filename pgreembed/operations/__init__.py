"""The operator's read-mostly commands: status, doctor, verify, the app-side search helper,
tune and recall (docs/operations.md, docs/search.md)."""
