//! The control API. Filled in by the control API issue.
