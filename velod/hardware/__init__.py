"""Hardware: snapshot types, NVML / sysfs / psutil sources and the monitor component."""
