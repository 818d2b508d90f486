//! setpoint-kubernetes: placeholder, built in its own issue.
