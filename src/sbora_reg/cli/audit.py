"""CLI verbs: audit (being built)."""
