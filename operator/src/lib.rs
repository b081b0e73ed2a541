//! The `IngestDrain` operator. Filled in by the operator issue.
