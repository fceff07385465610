"""recsvc's offline side: load and validate events, weight them, fit ALS, evaluate, export artifacts.

Imported lazily by the CLI so the online service never loads ``implicit``.
"""
