//! Placeholder: being written (monit alerts over SMTP).
