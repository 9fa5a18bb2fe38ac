"""Alembic migrations of the store (SQLite and PostgreSQL from the same models); run by node.store.migrate."""
