//! Placeholder: being written (vitals from procfs).
