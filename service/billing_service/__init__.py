"""ai-billing: a gRPC billing service for products that resell LLM access."""
