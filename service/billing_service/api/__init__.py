"""The gRPC transport: servicers translate messages and map errors; no rule lives here."""
