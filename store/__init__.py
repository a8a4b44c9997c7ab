"""The database (ORM models, sessions, queries) and the artifact store.

Import from the module that owns a function (`store.jobs`, `store.results`, `store.db`, ...): each
function has one import path. Mutating query functions commit their own unit of work.
"""
