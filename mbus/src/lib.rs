//! NATS message bus (placeholder until the NATS issue lands).
#![forbid(unsafe_code)]
