"""Integrations with other decode stacks (optional extras)."""
