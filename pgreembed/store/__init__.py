"""The data path's SQL and the bookkeeping's: every statement the processes run is a
function here. It stands on the ground floor only (values, errors, config, redaction) and
imports no feature (docs/architecture.md, tests/test_architecture.py)."""
