"""The ReasoningBank hub: the bank served over QUIC RPC with per-call JWT checks."""
