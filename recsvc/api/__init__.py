"""HTTP blueprints, one per surface of the API."""
