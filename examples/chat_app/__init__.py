"""A chat endpoint (FastAPI) billed through the ai-billing client; see docs/integration.md."""
