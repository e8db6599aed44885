"""`billingctl`: the operator's command line for a running billing service, over gRPC.

Needs only the client distribution (grpcio, protobuf): no server dependencies.
"""
