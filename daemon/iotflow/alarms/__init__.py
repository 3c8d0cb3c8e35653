"""Connection alarms: low uplink rate during scheduled windows."""
