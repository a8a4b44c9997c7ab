"""Alembic environment and versions for the store's schema (run via store.db.upgrade_database)."""
