"""Payments: the Stripe adapter, the charge outbox and its worker, webhook verification."""
