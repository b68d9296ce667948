"""CLI verbs: db (being built)."""
