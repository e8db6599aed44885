"""The billing rules in plain Python: money, pricing, access policy, settlement, errors.

Nothing here imports grpc, SQLAlchemy or Stripe, so every rule is testable in microseconds.
"""
