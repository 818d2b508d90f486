//! setpoint-ec2: placeholder, built in its own issue.
