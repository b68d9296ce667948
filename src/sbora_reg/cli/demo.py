"""CLI verbs: demo (being built)."""
