"""CLI verbs: overlap (being built)."""
