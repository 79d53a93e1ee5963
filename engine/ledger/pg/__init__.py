"""The PostgreSQL ledger (``PostgresStore``): a shared ledger for several gateways and hosts.

``conn`` drives an asyncpg connection from a worker's thread as the SQLite store drives
``sqlite3``, ``schema`` holds its own numbered migrations, ``store`` assembles the store.
asyncpg is imported only when a PostgreSQL ledger is opened.
"""
