//! setpoint-email: placeholder, built in its own issue.
