"""Persistence: SQLAlchemy models, database sessions and migrations, the file store.

``storage`` knows tables and files, nothing of networking or models.
"""
