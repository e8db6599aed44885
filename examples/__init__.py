"""Worked integrations of the ai-billing client."""
