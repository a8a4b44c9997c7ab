"""Alembic revisions (a package only so setuptools ships them)."""
