"""Storage: the SQL schema, the atomic ledger statements, and migrations (PostgreSQL or SQLite)."""
